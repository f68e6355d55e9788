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
    if (input.name === "mask_image") {
      checkSize(input);
      maskFileChosen(input.form);
    }
  });

  // ---- the mask: painted over the picture, sent as the form's mask_image file ------------------------------
  // The canvas has the picture's own pixels and lies over it; strokes are drawn in a colour that shows on any
  // picture and become white on black when the painting is put into the file input, after each stroke.

  var PAINT_RGB = [255, 40, 150];
  var PAINT = "rgb(" + PAINT_RGB.join(", ") + ")";

  function maskParts(form) {
    var editor = form && form.querySelector("[data-mask-editor]");
    if (!editor) return null;
    return {
      editor: editor,
      picture: editor.querySelector("[data-mask-picture]"),
      canvas: editor.querySelector("[data-mask-canvas]"),
      brush: editor.querySelector("[data-mask-brush]"),
      input: form.querySelector("input[type=file][name=mask_image]"),
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

  function showMaskEditor(form) {
    var parts = maskParts(form);
    if (!parts) return;
    var url = pictureUrl(form);
    parts.editor.hidden = !url;
    if (!url || parts.picture.getAttribute("src") === url) return;
    parts.editor.removeAttribute("data-ready");
    parts.picture.onload = function () {
      // Setting the size clears the canvas: a painting belongs to the picture it was painted on.
      parts.canvas.width = parts.picture.naturalWidth;
      parts.canvas.height = parts.picture.naturalHeight;
      parts.editor.setAttribute("data-ready", "");
      if (parts.input.files && parts.input.files.length && !parts.input.hasAttribute("data-painted")) {
        maskFileChosen(form);
      }
    };
    parts.picture.src = url;
    if (parts.input.hasAttribute("data-painted")) forgetPainting(parts);
  }

  function forgetPainting(parts) {
    parts.input.value = "";
    parts.input.removeAttribute("data-painted");
  }

  // A mask file chosen by hand shows on the picture (its white as paint) and can be painted on further.
  function maskFileChosen(form) {
    var parts = maskParts(form);
    if (!parts) return;
    parts.input.removeAttribute("data-painted");
    var context = parts.canvas.getContext("2d");
    context.clearRect(0, 0, parts.canvas.width, parts.canvas.height);
    if (!parts.input.files || !parts.input.files.length || !parts.canvas.width) return;
    var url = URL.createObjectURL(parts.input.files[0]);
    var mask = new Image();
    mask.onload = function () {
      URL.revokeObjectURL(url);
      context.drawImage(mask, 0, 0, parts.canvas.width, parts.canvas.height);
      var pixels = context.getImageData(0, 0, parts.canvas.width, parts.canvas.height);
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

  var stroke = null; // the stroke being painted: its form's parts and its last point

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
    if (!canvas || event.button !== 0) return;
    event.preventDefault();
    canvas.setPointerCapture(event.pointerId);
    stroke = { parts: maskParts(canvas.closest("form")), last: null };
    paint(event);
  });
  document.addEventListener("pointermove", function (event) {
    if (stroke) paint(event);
  });
  function endStroke() {
    if (!stroke) return;
    var form = stroke.parts.canvas.closest("form");
    stroke = null;
    exportMask(form);
  }
  document.addEventListener("pointerup", endStroke);
  document.addEventListener("pointercancel", endStroke);

  // The painting as the mask file: white where painted, black elsewhere, the picture's size.
  function exportMask(form) {
    var parts = maskParts(form);
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
        var files = new DataTransfer();
        files.items.add(new File([blob], "mask.png", { type: "image/png" }));
        parts.input.files = files.files;
        parts.input.setAttribute("data-painted", "");
        checkSize(parts.input);
        done();
      }, "image/png");
    });
    form.museMaskExport = exported;
    exported.then(function () {
      if (form.museMaskExport === exported) form.museMaskExport = null;
    });
  }

  // A Generate right after a stroke waits for the stroke's mask to be in the file input.
  document.addEventListener(
    "submit",
    function (event) {
      var form = event.target;
      if (!form.museMaskExport) return;
      event.preventDefault();
      event.stopImmediatePropagation();
      form.museMaskExport.then(function () {
        form.requestSubmit();
      });
    },
    true
  );

  document.addEventListener("click", function (event) {
    var clear = event.target instanceof Element && event.target.closest("[data-mask-clear]");
    if (!clear) return;
    var parts = maskParts(clear.closest("form"));
    parts.canvas.getContext("2d").clearRect(0, 0, parts.canvas.width, parts.canvas.height);
    parts.input.value = "";
    parts.input.removeAttribute("data-painted");
    checkSize(parts.input);
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
