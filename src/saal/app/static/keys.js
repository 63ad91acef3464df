// Keys: 1-9 pick a class (0 the 10th), s skips, Backspace undoes, h opens the image's history.
// A key clicks the button that carries it in data-key; the form then posts and the next page loads.
(function () {
  var sent = false;
  document.addEventListener("keydown", function (event) {
    var target = event.target;
    if (event.ctrlKey || event.metaKey || event.altKey || sent) return;
    if (target && target.closest && target.closest("input, select, textarea")) return;
    var key = event.key === "S" ? "s" : event.key;
    var element = document.querySelector('[data-key="' + CSS.escape(key) + '"]');
    if (!element || element.disabled) return;
    event.preventDefault();
    if (element.tagName === "BUTTON") sent = true; // one submission per page: a held key must not post twice
    element.classList.add("pressed");
    element.click();
  });
  window.addEventListener("pageshow", function () { sent = false; });
})();
