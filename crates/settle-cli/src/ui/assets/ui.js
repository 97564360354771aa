// The run page's live tally: polls the run's JSON while the page is open
// (slower while the tab is hidden or the run is quiet) and updates the
// numbers and the bar in place. Nothing else on the pages needs script.
(function () {
  "use strict";
  var live = document.querySelector("[data-live-run]");
  if (!live) return;
  var url = live.getAttribute("data-live-run");
  function set(field, text) {
    var nodes = document.querySelectorAll('[data-field="' + field + '"]');
    for (var i = 0; i < nodes.length; i++) nodes[i].textContent = text;
  }
  function poll() {
    if (document.hidden) { setTimeout(poll, 3000); return; }
    fetch(url, { credentials: "same-origin", headers: { "Accept": "application/json" } })
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (v) {
        var quiet = true;
        if (v) {
          ["succeeded", "failed", "pending", "total", "status"].forEach(function (f) { set(f, String(v[f])); });
          var st = document.querySelector('.live [data-field="status"]');
          if (st) st.className = "status " + v.status;
          set("busy", v.busy ? " (processing a retry)" : "");
          var bar = document.querySelector('.live [data-field="bar"]');
          if (bar && v.total > 0) {
            bar.children[0].style.width = (v.succeeded * 100 / v.total) + "%";
            bar.children[1].style.width = (v.failed * 100 / v.total) + "%";
          }
          quiet = v.pending === 0 && !v.redriving && !v.busy;
          live.setAttribute("data-quiet", quiet ? "true" : "false");
        }
        setTimeout(poll, quiet ? 5000 : 1000);
      })
      .catch(function () { setTimeout(poll, 5000); });
  }
  poll();
})();
