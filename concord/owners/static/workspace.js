// The owners' workspace works without this file; it only adds a keyboard shortcut ("/" focuses the search).
document.addEventListener("keydown", function (event) {
  var search = document.getElementById("q");
  var typing = /^(INPUT|TEXTAREA|SELECT)$/.test((document.activeElement || {}).tagName || "");
  if (event.key === "/" && search && !typing) {
    event.preventDefault();
    search.focus();
  }
});
