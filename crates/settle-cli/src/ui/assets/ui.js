// The live parts of the pages. Every element with data-live-run (the run
// page's tally, a settling run's row on the runs page) polls that run's
// JSON while the page is open (slower while the tab is hidden or the run
// is quiet; a row stops once its run has settled, and any element stops
// at an answer that polling again cannot change: 401, 403, 404, 410, 421),
// updates its own fields and bar in place, and draws the throughput it
// samples in its chart. The "select every item" box ticks a page's failed
// items. Nothing else needs script: every action is a link to a confirm
// page and a form.
(function () {
  "use strict";
  var POINTS = 120;

  function watch(el) {
    var url = el.getAttribute("data-live-run");
    var samples = [];
    var last = null;
    function each(field, f) {
      var nodes = el.querySelectorAll('[data-field="' + field + '"]');
      for (var i = 0; i < nodes.length; i++) f(nodes[i]);
    }
    function set(field, text) {
      each(field, function (n) { n.textContent = text; });
    }
    // Items settled per second: new successes, and new failures beyond
    // those that a retry turned into successes (a retried item that fails
    // again changes no count, so it does not show).
    function draw(v) {
      var now = Date.now();
      if (last && now > last.t) {
        var settled = (v.succeeded - last.s) + Math.max(0, v.failed - last.f);
        samples.push(Math.max(0, settled * 1000 / (now - last.t)));
        if (samples.length > POINTS) samples.shift();
      }
      last = { t: now, s: v.succeeded, f: v.failed };
      if (!samples.length) return;
      var peak = Math.max.apply(null, samples);
      var scale = Math.max(peak, 1);
      // The chart fills its width from 30 samples on.
      var span = Math.max(samples.length - 1, 30);
      var points = samples.map(function (r, i) {
        return (i * 300 / span).toFixed(1) + "," + (59 - r * 57 / scale).toFixed(1);
      }).join(" ");
      each("chart", function (svg) {
        svg.querySelector("polyline").setAttribute("points", points);
        svg.setAttribute("data-points", String(samples.length));
      });
      set("rate-now", String(Math.round(samples[samples.length - 1])));
      set("rate-peak", String(Math.round(peak)));
    }
    function show(v) {
      ["succeeded", "failed", "pending", "total", "status"].forEach(function (f) { set(f, String(v[f])); });
      set("tally", v.succeeded + " succeeded / " + v.failed + " failed / " + v.pending + " pending of " + v.total);
      each("status", function (n) { n.className = "status " + v.status; });
      set("busy", v.busy ? " (processing a retry)" : "");
      each("bar", function (bar) {
        if (v.total > 0) {
          bar.children[0].style.width = (v.succeeded * 100 / v.total) + "%";
          bar.children[1].style.width = (v.failed * 100 / v.total) + "%";
        }
      });
      draw(v);
    }
    function poll() {
      if (document.hidden) { setTimeout(poll, 3000); return; }
      var once = el.hasAttribute("data-live-until-settled");
      fetch(url, { credentials: "same-origin", headers: { "Accept": "application/json" } })
        .then(function (r) {
          // Gone or not allowed: asking again will not change that.
          if ([401, 403, 404, 410, 421].indexOf(r.status) >= 0) return "stop";
          return r.ok ? r.json() : null;
        })
        .then(function (v) {
          if (v === "stop") return;
          var quiet = true;
          if (v) {
            show(v);
            quiet = v.pending === 0 && !v.redriving && !v.busy;
            // A settled run's chart shows once the run moves again.
            var fig = el.querySelector("figure.throughput[hidden]");
            if (fig && !quiet && samples.length) fig.hidden = false;
            el.setAttribute("data-quiet", quiet ? "true" : "false");
            if (once && quiet && v.status !== "running") return;
          }
          setTimeout(poll, quiet ? 5000 : 1000);
        })
        .catch(function () { setTimeout(poll, 5000); });
    }
    poll();
  }

  var live = document.querySelectorAll("[data-live-run]");
  for (var i = 0; i < live.length; i++) watch(live[i]);

  var all = document.querySelector("[data-select-all]");
  if (all) {
    all.addEventListener("change", function () {
      var boxes = all.form.querySelectorAll('input[name="item"]');
      for (var i = 0; i < boxes.length; i++) boxes[i].checked = all.checked;
    });
  }
})();
