// Expo Free Agent dashboard: follows the event stream and refreshes what an event concerns.
//
// A live region is an element with `data-topics` (space separated: `*`, a kind such as `build.log`,
// a kind prefix such as `build.*`, `build:<id>` or `worker:<id>`) and an htmx `hx-get` that re-renders
// it. The log tail (`data-log`) instead fetches the lines after the last `data-seq` it shows.
// Refreshes are throttled per region, and everything is refreshed after a reconnect (events may have
// been missed while disconnected).
(function () {
  "use strict";

  var KINDS = [
    "build.submitted", "build.assigned", "build.building", "build.progress", "build.log",
    "build.retry_scheduled", "build.rescued", "build.timed_out", "build.completed", "build.failed",
    "build.cancelled", "build.requeued", "build.deleted", "build.updated", "build.finished",
    "worker.registered", "worker.online", "worker.offline", "worker.draining", "worker.disabled",
    "worker.enabled", "worker.revoked", "queue.paused", "queue.resumed", "message"
  ];
  var THROTTLE_MS = 250;

  function matches(topics, ev) {
    return topics.split(/\s+/).some(function (t) {
      if (!t) return false;
      if (t === "*") return true;
      if (t.slice(-2) === ".*") return (ev.kind || "").indexOf(t.slice(0, -1)) === 0;
      if (t.indexOf("build:") === 0) return ev.build_id === t.slice(6);
      if (t.indexOf("worker:") === 0) return ev.worker_id === t.slice(7);
      return ev.kind === t;
    });
  }

  function fetchLog(el) {
    if (el._busy) { el._again = true; return; }
    el._busy = true;
    var after = el.getAttribute("data-after") || "0";
    fetch(el.getAttribute("data-log") + "?after=" + encodeURIComponent(after), {
      headers: { "HX-Request": "true" }, credentials: "same-origin"
    }).then(function (r) {
      if (r.status === 401) { location.reload(); return ""; }
      return r.ok ? r.text() : "";
    }).then(function (html) {
      el._busy = false;
      if (html && html.trim()) {
        var atBottom = el.scrollHeight - el.scrollTop - el.clientHeight < 40;
        var empty = el.querySelector(".log-empty");
        if (empty) empty.remove();
        el.insertAdjacentHTML("beforeend", html);
        var lines = el.querySelectorAll("[data-seq]");
        var last = lines[lines.length - 1];
        if (last) el.setAttribute("data-after", last.getAttribute("data-seq"));
        if (atBottom) el.scrollTop = el.scrollHeight;
        if ((html.match(/data-seq=/g) || []).length >= 500) el._again = true;
      }
      if (el._again) { el._again = false; fetchLog(el); }
    }).catch(function () { el._busy = false; });
  }

  function refresh(el) {
    if (el.hasAttribute("data-log")) { fetchLog(el); return; }
    if (el._busy) { el._again = true; return; }
    if (window.htmx) window.htmx.trigger(el, "refresh");
  }

  function schedule(el) {
    if (el._timer) return;
    el._timer = setTimeout(function () { el._timer = null; refresh(el); }, THROTTLE_MS);
  }

  function onEvent(e) {
    var ev;
    try { ev = JSON.parse(e.data); } catch (_) { return; }
    if (!ev.kind) ev.kind = e.type;
    document.querySelectorAll("[data-topics]").forEach(function (el) {
      if (matches(el.getAttribute("data-topics"), ev)) schedule(el);
    });
  }

  function refreshAll() {
    document.querySelectorAll("[data-topics]").forEach(schedule);
  }

  function setStatus(state, text) {
    var badge = document.getElementById("live");
    if (!badge) return;
    badge.className = "live " + state;
    badge.textContent = text;
  }

  var retryMs = 1000;
  function connect() {
    var url = document.body.getAttribute("data-events");
    if (!url || !window.EventSource) return;
    var source = new EventSource(url);
    var hadError = false;
    KINDS.forEach(function (k) { source.addEventListener(k, onEvent); });
    source.onopen = function () {
      setStatus("ok", "Live");
      retryMs = 1000;
      if (hadError) refreshAll();
    };
    source.onerror = function () {
      hadError = true;
      if (source.readyState === EventSource.CLOSED) {
        setStatus("bad", "Disconnected — retrying");
        source.close();
        setTimeout(connect, retryMs);
        retryMs = Math.min(retryMs * 2, 15000);
      } else {
        setStatus("warn", "Reconnecting…");
      }
    };
    window.addEventListener("pagehide", function () { source.close(); });
  }

  // Bulk actions: what is selected, which actions apply to it, and a confirmation naming both.
  var FINAL = { completed: 1, failed: 1, cancelled: 1 };
  var APPLIES = {
    cancel: function (s) { return !FINAL[s]; },
    retry: function (s) { return s === "failed" || s === "cancelled"; }
  };
  function selection() {
    var boxes = Array.prototype.slice.call(document.querySelectorAll('input[name="id"][form="bulk"]'));
    var matching = document.getElementById("select-matching");
    return {
      boxes: boxes,
      checked: boxes.filter(function (c) { return c.checked; }),
      matching: !!(matching && matching.checked)
    };
  }
  function bulkState() {
    var form = document.getElementById("bulk");
    if (!form) return;
    var sel = selection();
    var states = sel.checked.map(function (c) { return c.getAttribute("data-state"); });
    form.querySelectorAll("button[name=action]").forEach(function (b) {
      var applies = sel.matching || states.some(APPLIES[b.value] || function () { return false; });
      b.disabled = !sel.matching && sel.checked.length === 0;
      b.hidden = !sel.matching && sel.checked.length > 0 && !applies;
    });
    var count = document.getElementById("bulk-count");
    if (count) {
      count.textContent = sel.matching ? "All matching the filter:" :
        sel.checked.length ? sel.checked.length + " selected:" : "Select builds to act on them";
    }
    var page = document.getElementById("select-page");
    if (page) page.checked = sel.boxes.length > 0 && sel.checked.length === sel.boxes.length;
  }
  document.addEventListener("change", function (e) {
    var t = e.target;
    if (t.id === "select-page") {
      selection().boxes.forEach(function (c) { c.checked = t.checked; });
    }
    if (t.id === "select-page" || t.id === "select-matching" || t.getAttribute("form") === "bulk") bulkState();
  });
  document.addEventListener("htmx:afterSettle", bulkState);

  // Confirmation step before every action that changes something.
  document.addEventListener("submit", function (e) {
    var form = e.target;
    var question = form.getAttribute && form.getAttribute("data-confirm");
    // (Not `form.id`: the checkboxes named "id" belong to this form and shadow that property.)
    if (form.getAttribute && form.getAttribute("id") === "bulk" && e.submitter) {
      var sel = selection();
      var verb = e.submitter.textContent.trim();
      question = sel.matching ? verb + " every build matching the filter (up to 100)?" :
        verb + " " + sel.checked.length + (sel.checked.length === 1 ? " build?" : " builds?");
    }
    if (question && !window.confirm(question)) e.preventDefault();
  }, true);

  // Regions: track requests, keep checked boxes across a refresh, follow an expired session.
  document.addEventListener("htmx:beforeRequest", function (e) { e.target._busy = true; });
  document.addEventListener("htmx:afterRequest", function (e) {
    var el = e.target;
    el._busy = false;
    if (e.detail && e.detail.xhr && e.detail.xhr.status === 401) { location.reload(); return; }
    if (el._again) { el._again = false; schedule(el); }
  });
  document.addEventListener("htmx:beforeSwap", function (e) {
    var el = e.target;
    el._checked = Array.prototype.map.call(
      el.querySelectorAll("input[type=checkbox]:checked"), function (c) { return c.value; });
  });
  document.addEventListener("htmx:afterSwap", function (e) {
    var el = e.target;
    (el._checked || []).forEach(function (v) {
      el.querySelectorAll("input[type=checkbox]").forEach(function (c) { if (c.value === v) c.checked = true; });
    });
  });

  // The log viewer's "Load earlier lines": the lines before the first one shown, until line 1.
  function loadEarlier(button) {
    var log = document.getElementById("log");
    if (!log || button._busy) return;
    button._busy = true;
    var before = button.getAttribute("data-before");
    fetch(log.getAttribute("data-log") + "?before=" + encodeURIComponent(before), {
      headers: { "HX-Request": "true" }, credentials: "same-origin"
    }).then(function (r) {
      if (r.status === 401) { location.reload(); return ""; }
      return r.ok ? r.text() : "";
    }).then(function (html) {
      button._busy = false;
      if (!html || !html.trim()) { button.remove(); return; }
      var height = log.scrollHeight;
      log.insertAdjacentHTML("afterbegin", html);
      log.scrollTop += log.scrollHeight - height;
      var first = log.querySelector("[data-seq]");
      var seq = first ? parseInt(first.getAttribute("data-seq"), 10) : 1;
      if (seq <= 1) button.remove(); else button.setAttribute("data-before", String(seq));
    }).catch(function () { button._busy = false; });
  }
  document.addEventListener("click", function (e) {
    var button = e.target.closest && e.target.closest("#log-earlier");
    if (button) loadEarlier(button);
  });

  document.addEventListener("DOMContentLoaded", function () {
    var log = document.getElementById("log");
    if (log) log.scrollTop = log.scrollHeight;
    bulkState();
    var flash = document.querySelector(".flash");
    if (flash && history.replaceState) {
      var url = new URL(location.href);
      url.searchParams.delete("notice");
      url.searchParams.delete("error");
      history.replaceState(null, "", url.pathname + url.search + url.hash);
    }
    connect();
  });
})();
