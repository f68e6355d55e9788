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
    if (input) {
      var limit = Number(input.getAttribute("data-max-bytes")) || Infinity;
      input.setCustomValidity(chosen && input.files[0].size > limit ? input.getAttribute("data-too-large") : "");
    }
    if (preview) {
      if (preview.src) URL.revokeObjectURL(preview.src);
      if (chosen) preview.src = URL.createObjectURL(input.files[0]);
      else preview.removeAttribute("src");
      preview.hidden = !chosen;
    }
    if (picked) picked.hidden = chosen;
    var blank = form.querySelector("select[name=size] option[data-picture-label]");
    if (blank) blank.textContent = blank.getAttribute(chosen || picked ? "data-picture-label" : "data-text-label");
  }

  document.addEventListener("change", function (event) {
    var input = event.target;
    if (input instanceof HTMLInputElement && input.type === "file" && input.name === "init_image" && input.form) {
      pictureChanged(input.form);
    }
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
