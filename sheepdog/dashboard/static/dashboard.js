// The dashboard's only script: copy buttons, and a live request page that polls its
// counts and, when they change, swaps in what the server drew again. Nothing else.
(function () {
  "use strict";
  // On the document, so that buttons swapped in by a live page work too.
  document.addEventListener("click", function (event) {
    var button = event.target;
    if (!button.matches || !button.matches("button.copy")) { return; }
    var text = button.parentNode.querySelector("code").textContent;
    if (navigator.clipboard) {
      navigator.clipboard.writeText(text).then(function () { button.textContent = "copied"; });
    }
  });
  var summary = document.getElementById("summary");
  if (!summary || summary.dataset.state !== "running") { return; }
  var last = null;
  function poll() {
    fetch(summary.dataset.progress, {cache: "no-store"}).then(function (r) {
      return r.ok ? r.json() : null;
    }).then(function (p) {
      if (!p) { return; }
      document.getElementById("elapsed").textContent = p.elapsed;
      document.getElementById("finished").textContent = p.finished;
      var state = document.getElementById("state");
      state.textContent = p.state;
      state.className = "state-" + p.state;
      var key = JSON.stringify(p.counts) + p.state;
      var refresh = key !== last;
      last = key;
      if (refresh) {
        fetch(summary.dataset.charts, {cache: "no-store"}).then(function (r) {
          return r.ok ? r.text() : null;
        }).then(function (html) {
          if (html !== null) { document.getElementById("charts").innerHTML = html; }
        });
      }
      if (p.state === "running") { setTimeout(poll, Number(summary.dataset.pollMs)); }
      else { window.location.reload(); }
    }).catch(function () { setTimeout(poll, 4 * Number(summary.dataset.pollMs)); });
  }
  setTimeout(poll, Number(summary.dataset.pollMs));
})();
