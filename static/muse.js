// Small behaviours htmx does not cover. Delegated from document, so swapped-in content needs no setup.
(function () {
  "use strict";

  // Enter generates, Shift+Enter (or an IME composing text) types a new line.
  document.addEventListener("keydown", function (event) {
    var field = event.target;
    if (event.key !== "Enter" || event.shiftKey || event.isComposing) return;
    if (!(field instanceof HTMLTextAreaElement) || !field.hasAttribute("data-submit-on-enter")) return;
    event.preventDefault();
    if (field.form && field.form.reportValidity()) field.form.requestSubmit();
  });

  document.addEventListener("click", function (event) {
    var dice = event.target.closest("[data-dice]");
    if (dice) {
      var input = document.querySelector(dice.getAttribute("data-dice"));
      var value = new Uint32Array(1);
      crypto.getRandomValues(value);
      input.value = String(value[0]);
      input.dispatchEvent(new Event("input", { bubbles: true }));
      return;
    }
    var dismiss = event.target.closest("[data-dismiss]");
    if (dismiss) {
      dismiss.closest(".card").remove();
      return;
    }
    // Without JavaScript the link reloads the form without its picture; here the rest of the form stays as typed.
    var unpick = event.target.closest("[data-unpick]");
    if (unpick && unpick.closest("form")) {
      event.preventDefault();
      var form = unpick.closest("form");
      unpick.closest("[data-picked]").remove();
      pictureChanged(form);
    }
  });

  // The form's picture: a chosen file shows as a preview and stands in for a picture the form named (which
  // comes back if the file is cleared); the Size's blank option says where the size then comes from.
  function pictureChanged(form) {
    var input = form.querySelector("input[type=file][name=init_image]");
    var preview = form.querySelector("[data-preview]");
    var picked = form.querySelector("[data-picked]");
    var chosen = !!(input && input.files && input.files.length);
    // Refused before it is sent: a file far over the limit would otherwise be cut off by the body limit,
    // with a message that does not name the field.
    if (input) checkSize(input);
    if (preview) {
      if (preview.src) URL.revokeObjectURL(preview.src);
      if (chosen) preview.src = URL.createObjectURL(input.files[0]);
      else preview.removeAttribute("src");
      preview.hidden = !chosen;
    }
    if (picked) picked.hidden = chosen;
    var blank = form.querySelector("select[name=size] option[data-picture-label]");
    if (blank) blank.textContent = blank.getAttribute(chosen || picked ? "data-picture-label" : "data-text-label");
    showMaskEditor(form);
  }

  // A chosen file over the server's limit is refused before it is sent (see pictureChanged).
  function checkSize(input) {
    var limit = Number(input.getAttribute("data-max-bytes")) || Infinity;
    var chosen = input.files && input.files.length;
    input.setCustomValidity(chosen && input.files[0].size > limit ? input.getAttribute("data-too-large") : "");
  }

  document.addEventListener("change", function (event) {
    var input = event.target;
    if (!(input instanceof HTMLInputElement) || input.type !== "file" || !input.form) return;
    if (input.name === "init_image") pictureChanged(input.form);
    if (input.name === "mask_image") maskFileChosen(input.form);
  });

  // ---- the mask: painted over the picture, sent as the form's mask_image file ------------------------------
  // The canvas has the picture's own pixels and lies over it; strokes are drawn in a colour that shows on any
  // picture and become white on black when the painting is put into the file input, after each stroke. A mask
  // the form's named picture came with (its job's) shows as paint; Clear mask tells the server to drop it.

  var PAINT_RGB = [255, 40, 150];
  var PAINT = "rgb(" + PAINT_RGB.join(", ") + ")";
  var SMALL = 128; // pictures up to this wide show their pixels as squares, not blurred

  function maskParts(form) {
    var editor = form && form.querySelector("[data-mask-editor]");
    if (!editor) return null;
    return {
      editor: editor,
      stage: editor.querySelector(".mask-stage"),
      picture: editor.querySelector("[data-mask-picture]"),
      canvas: editor.querySelector("[data-mask-canvas]"),
      brush: editor.querySelector("[data-mask-brush]"),
      input: form.querySelector("input[type=file][name=mask_image]"),
      stored: form.querySelector("[data-stored-mask]"),
    };
  }

  // The picture the form starts from: a chosen file's preview, else the picture it names; "" for none.
  function pictureUrl(form) {
    var preview = form.querySelector("[data-preview]");
    if (preview && !preview.hidden && preview.getAttribute("src")) return preview.src;
    var picked = form.querySelector("[data-picked]");
    var image = picked && !picked.hidden && picked.querySelector("img");
    return image ? image.src : "";
  }

  // Anything in flight for the painting (an export, a mask being drawn) is for the painting it began on.
  function nextPainting(form) {
    form.musePainting = (form.musePainting || 0) + 1;
    return form.musePainting;
  }

  function showMaskEditor(form) {
    var parts = maskParts(form);
    if (!parts) return;
    var url = pictureUrl(form);
    parts.editor.hidden = !url;
    if (!url || parts.picture.getAttribute("src") === url) return;
    // A new picture: what was painted belongs to the old one, and nothing is painted until this one is in.
    parts.editor.removeAttribute("data-ready");
    parts.canvas.width = parts.canvas.width; // clears it
    if (parts.input.hasAttribute("data-painted")) forgetPainting(parts);
    nextPainting(form);
    parts.picture.onload = function () {
      parts.canvas.width = parts.picture.naturalWidth;
      parts.canvas.height = parts.picture.naturalHeight;
      parts.stage.classList.toggle("small", parts.picture.naturalWidth <= SMALL);
      parts.editor.setAttribute("data-ready", "");
      if (parts.input.files && parts.input.files.length) {
        maskFileChosen(form); // checked against, and shown on, this picture
      } else if (usesStoredMask(form)) {
        var picked = form.querySelector("[data-picked] img");
        drawMask(form, picked.getAttribute("data-mask-url"), null);
      }
    };
    parts.picture.onerror = function () {
      parts.editor.hidden = true; // nothing to paint on: the server names what is wrong with the picture
    };
    parts.picture.src = url;
  }

  // Whether the picture in use is a named one whose job's mask still applies.
  function usesStoredMask(form) {
    var parts = maskParts(form);
    var picked = form.querySelector("[data-picked]");
    var image = picked && !picked.hidden && picked.querySelector("img[data-mask-url]");
    return !!(image && parts.stored && parts.stored.value !== "cleared" && pictureUrl(form) === image.src);
  }

  function forgetPainting(parts) {
    parts.input.value = "";
    parts.input.removeAttribute("data-painted");
    checkSize(parts.input);
  }

  // A mask file chosen by hand shows on the picture as paint (its white), to paint on further; one of another
  // size than the picture is refused here, as the server would refuse it.
  function maskFileChosen(form) {
    var parts = maskParts(form);
    if (!parts) return;
    parts.input.removeAttribute("data-painted");
    checkSize(parts.input); // and no word of an earlier file's size
    parts.canvas.getContext("2d").clearRect(0, 0, parts.canvas.width, parts.canvas.height);
    nextPainting(form);
    if (!parts.input.files || !parts.input.files.length || !parts.editor.hasAttribute("data-ready")) return;
    var url = URL.createObjectURL(parts.input.files[0]);
    drawMask(form, url, function () {
      URL.revokeObjectURL(url);
    });
  }

  function drawMask(form, url, done) {
    var parts = maskParts(form);
    var painting = form.musePainting;
    var mask = new Image();
    mask.onerror = function () {
      if (done) done(); // not a picture: the server says so by name
    };
    mask.onload = function () {
      if (done) done();
      if (form.musePainting !== painting) return; // cleared, or another picture or file, meanwhile
      var width = parts.canvas.width;
      var height = parts.canvas.height;
      if (mask.naturalWidth !== width || mask.naturalHeight !== height) {
        parts.input.setCustomValidity(
          "This mask is " + mask.naturalWidth + "x" + mask.naturalHeight + ", the picture " + width + "x" +
            height + ": choose a mask of the picture's size."
        );
        return;
      }
      var context = parts.canvas.getContext("2d");
      context.drawImage(mask, 0, 0);
      var pixels = context.getImageData(0, 0, width, height);
      for (var i = 0; i < pixels.data.length; i += 4) {
        var white = pixels.data[i]; // a mask's red is its grey
        pixels.data[i] = PAINT_RGB[0];
        pixels.data[i + 1] = PAINT_RGB[1];
        pixels.data[i + 2] = PAINT_RGB[2];
        pixels.data[i + 3] = white;
      }
      context.putImageData(pixels, 0, 0);
    };
    mask.src = url;
  }

  var stroke = null; // the stroke being painted: its form's parts, its pointer and its last point

  function point(canvas, event) {
    var box = canvas.getBoundingClientRect();
    var scale = canvas.width / box.width;
    return { x: (event.clientX - box.left) * scale, y: (event.clientY - box.top) * scale, scale: scale };
  }

  function paint(event) {
    var at = point(stroke.parts.canvas, event);
    var context = stroke.parts.canvas.getContext("2d");
    var width = Number(stroke.parts.brush.value) * at.scale;
    context.strokeStyle = context.fillStyle = PAINT;
    context.lineWidth = width;
    context.lineCap = context.lineJoin = "round";
    context.beginPath();
    if (stroke.last) {
      context.moveTo(stroke.last.x, stroke.last.y);
      context.lineTo(at.x, at.y);
      context.stroke();
    } else {
      context.arc(at.x, at.y, width / 2, 0, 2 * Math.PI); // a dab: a line of no length draws nothing
      context.fill();
    }
    stroke.last = at;
  }

  document.addEventListener("pointerdown", function (event) {
    var canvas = event.target instanceof Element && event.target.closest("[data-mask-canvas]");
    if (!canvas || event.button !== 0 || stroke) return;
    var parts = maskParts(canvas.closest("form"));
    if (!parts.editor.hasAttribute("data-ready")) return; // its picture is not in yet
    event.preventDefault();
    canvas.setPointerCapture(event.pointerId);
    stroke = { parts: parts, pointer: event.pointerId, last: null };
    paint(event);
  });
  document.addEventListener("pointermove", function (event) {
    if (stroke && event.pointerId === stroke.pointer) paint(event);
  });
  function endStroke(event) {
    if (!stroke || event.pointerId !== stroke.pointer) return;
    var form = stroke.parts.canvas.closest("form");
    stroke = null;
    exportMask(form);
  }
  document.addEventListener("pointerup", endStroke);
  document.addEventListener("pointercancel", endStroke);

  // The painting as the mask file: white where painted, black elsewhere, the picture's size.
  function exportMask(form) {
    var parts = maskParts(form);
    var painting = nextPainting(form);
    var width = parts.canvas.width;
    var height = parts.canvas.height;
    var white = document.createElement("canvas");
    white.width = width;
    white.height = height;
    var context = white.getContext("2d");
    context.drawImage(parts.canvas, 0, 0);
    context.globalCompositeOperation = "source-in"; // keep the strokes' coverage, in white
    context.fillStyle = "#fff";
    context.fillRect(0, 0, width, height);
    var out = document.createElement("canvas");
    out.width = width;
    out.height = height;
    var flat = out.getContext("2d");
    flat.fillStyle = "#000";
    flat.fillRect(0, 0, width, height);
    flat.drawImage(white, 0, 0);
    var exported = new Promise(function (done) {
      out.toBlob(function (blob) {
        if (form.musePainting === painting) {
          var files = new DataTransfer();
          files.items.add(new File([blob], "mask.png", { type: "image/png" }));
          parts.input.files = files.files;
          parts.input.setAttribute("data-painted", "");
          checkSize(parts.input);
        }
        done();
      }, "image/png");
    });
    form.museMaskExport = exported;
    exported.then(function () {
      if (form.museMaskExport === exported) form.museMaskExport = null;
    });
  }

  // A Generate right after a stroke waits for the stroke's mask to be in the file input (once, however many
  // times it is pressed meanwhile).
  document.addEventListener(
    "submit",
    function (event) {
      var form = event.target;
      if (!form.museMaskExport) return;
      event.preventDefault();
      event.stopImmediatePropagation();
      if (form.museSubmitWaiting) return;
      form.museSubmitWaiting = true;
      form.museMaskExport.then(function () {
        form.museSubmitWaiting = false;
        form.requestSubmit();
      });
    },
    true
  );

  document.addEventListener("click", function (event) {
    var clear = event.target instanceof Element && event.target.closest("[data-mask-clear]");
    if (!clear) return;
    var form = clear.closest("form");
    var parts = maskParts(form);
    nextPainting(form); // an export or a mask still being drawn is for the painting cleared here
    parts.canvas.getContext("2d").clearRect(0, 0, parts.canvas.width, parts.canvas.height);
    if (parts.stored) parts.stored.value = "cleared";
    forgetPainting(parts);
  });

  // A form that comes with a picture it names (a gallery image's "Use as init image", "Reuse seed" swapping in
  // a refilled form) gets its editor at once.
  function setUpMasks(root) {
    root.querySelectorAll("[data-mask-editor]").forEach(function (editor) {
      showMaskEditor(editor.closest("form"));
    });
  }
  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", function () {
      setUpMasks(document);
    });
  } else {
    setUpMasks(document);
  }
  document.addEventListener("htmx:afterSwap", function (event) {
    setUpMasks(event.target);
  });

  function notice(text) {
    var box = document.getElementById("notice");
    if (!box) return;
    box.textContent = text;
    box.hidden = !text;
  }

  function card(title, message, link) {
    var article = document.createElement("article");
    article.className = "card problem tone-error";
    article.setAttribute("role", "alert");
    var head = document.createElement("h3");
    head.className = "card-title";
    head.textContent = title;
    var body = document.createElement("p");
    body.className = "problem-message";
    body.textContent = message;
    article.append(head, body);
    if (link) {
      var go = document.createElement("a");
      go.className = "button";
      go.href = link.href;
      go.textContent = link.text;
      var actions = document.createElement("p");
      actions.className = "actions";
      actions.append(go);
      article.append(actions);
    }
    return article.outerHTML;
  }

  // A JSON error (the sign-in layer, a route outside the pages, a proxy) becomes a readable card, never a dump.
  document.addEventListener("htmx:beforeSwap", function (event) {
    var xhr = event.detail.xhr;
    var type = xhr.getResponseHeader("Content-Type") || "";
    if (type.indexOf("application/json") === -1) return;
    var message = "The server answered " + xhr.status + ".";
    try {
      message = JSON.parse(xhr.responseText).error.message || message;
    } catch (ignored) {}
    message = message.charAt(0).toUpperCase() + message.slice(1);
    var signIn = xhr.status === 401 || xhr.status === 403;
    var here = location.pathname + location.search;
    event.detail.serverResponse = signIn
      ? card("Please sign in again", message, { href: "/login?next=" + encodeURIComponent(here), text: "Sign in" })
      : card("Something went wrong", message);
    event.detail.shouldSwap = true;
  });

  // Server unreachable. A job card's event stream reconnects by itself (EventSource does); say so meanwhile.
  document.addEventListener("htmx:sendError", function () {
    notice("Can't reach the server. Try again in a moment.");
  });
  document.addEventListener("htmx:sseError", function () {
    notice("Can't reach the server. Retrying…");
  });
  document.addEventListener("htmx:sseOpen", function () {
    notice("");
  });

  document.addEventListener("htmx:afterRequest", function (event) {
    if (event.detail.successful !== false && event.detail.xhr && event.detail.xhr.status) notice("");
  });
})();
