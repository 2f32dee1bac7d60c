/* routesurgeon report: view switching, drill-down, tooltips and per-channel canvases.
   Inlined into every HTML report; no external resources. */
(function () {
  "use strict";
  var D = JSON.parse(document.getElementById("rs-data").textContent);
  var $ = function (sel, root) { return (root || document).querySelector(sel); };
  var $$ = function (sel, root) { return Array.prototype.slice.call((root || document).querySelectorAll(sel)); };

  function hexRgb(c) {
    c = c.replace("#", "");
    return [parseInt(c.slice(0, 2), 16), parseInt(c.slice(2, 4), 16), parseInt(c.slice(4, 6), 16)];
  }
  var VIR = D.viridis.map(hexRgb);
  function viridis(v) {
    if (!(v >= 0)) v = 0;
    if (v > 1) v = 1;
    var pos = v * (VIR.length - 1), i = Math.min(Math.floor(pos), VIR.length - 2), f = pos - i;
    var a = VIR[i], b = VIR[i + 1];
    return [Math.round(a[0] + (b[0] - a[0]) * f), Math.round(a[1] + (b[1] - a[1]) * f),
            Math.round(a[2] + (b[2] - a[2]) * f)];
  }
  function css(rgb) { return "rgb(" + rgb[0] + "," + rgb[1] + "," + rgb[2] + ")"; }
  function u8(b64) {
    var s = atob(b64), out = new Uint8Array(s.length);
    for (var i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
    return out;
  }
  function fmt(v) {
    if (v === null || v === undefined || !isFinite(v)) return "—";
    var a = Math.abs(v);
    return (a !== 0 && (a >= 1000 || a < 0.01)) ? v.toExponential(3) : v.toPrecision(4);
  }
  function esc(s) {
    return String(s).replace(/[&<>"]/g, function (c) {
      return { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" }[c];
    });
  }

  /* -- tooltips ------------------------------------------------------------------------ */
  var tip = $("#tip");
  document.addEventListener("mousemove", function (ev) {
    var el = ev.target && ev.target.closest ? ev.target.closest("[data-tip]") : null;
    if (!el) { tip.hidden = true; return; }
    tip.textContent = el.getAttribute("data-tip");
    tip.hidden = false;
    var x = ev.clientX + 14, y = ev.clientY + 14, w = tip.offsetWidth, h = tip.offsetHeight;
    if (x + w > window.innerWidth - 4) x = ev.clientX - w - 10;
    if (y + h > window.innerHeight - 4) y = ev.clientY - h - 10;
    tip.style.left = x + "px";
    tip.style.top = y + "px";
  });

  /* -- sharing graph ----------------------------------------------------------------------- */
  var graph = $("#graph");
  function tpl(id) {
    var t = document.getElementById(id);
    return t ? t.innerHTML : "";
  }
  function segSelect(container, btn) {
    $$("button", container).forEach(function (b) { b.classList.toggle("on", b === btn); });
  }
  if (graph) {
    var canvas = $("#graph-canvas"), drill = $("#drill"), body = $("#drill-body");
    $("#depth-btns").addEventListener("click", function (ev) {
      var b = ev.target.closest("button");
      if (!b) return;
      canvas.innerHTML = tpl("gv-" + b.getAttribute("data-d"));
      segSelect($("#depth-btns"), b);
    });
    $("#focus-btns").addEventListener("click", function (ev) {
      var b = ev.target.closest("button");
      if (!b) return;
      graph.setAttribute("data-route", b.getAttribute("data-t"));
      segSelect($("#focus-btns"), b);
    });
    var barsel = $("#barsel");
    if (barsel) barsel.addEventListener("change", function () {
      graph.setAttribute("data-bar", barsel.value);
    });
    var crumbs = $("#crumbs");
    function openBlock(name) {
      if (!(name in D.subs)) return;
      body.innerHTML = tpl("sv-" + D.subs[name]);
      var parts = name.split("."), html = [];
      for (var i = 0; i < parts.length; i++) {
        var pre = parts.slice(0, i + 1).join(".");
        if (i) html.push('<span class="sep">›</span>');
        html.push(pre in D.subs && pre !== name
          ? '<a data-open="' + esc(pre) + '">' + esc(parts[i]) + "</a>"
          : "<b>" + esc(parts[i]) + "</b>");
      }
      crumbs.innerHTML = html.join("");
      drill.hidden = false;
      drill.scrollIntoView({ block: "nearest" });
    }
    crumbs.addEventListener("click", function (ev) {
      var a = ev.target.closest("[data-open]");
      if (a) openBlock(a.getAttribute("data-open"));
    });
    graph.addEventListener("click", function (ev) {
      var blk = ev.target.closest(".blk.x");
      if (blk) openBlock(blk.getAttribute("data-b"));
    });
    $("#drill-close").addEventListener("click", function () { drill.hidden = true; });
  }

  /* -- importance heat map ------------------------------------------------------------------ */
  var cbar = $("#cbar");
  if (cbar) {
    cbar.style.background = "linear-gradient(to right," + D.viridis.join(",") + ")";
    cbar.setAttribute("data-tip", "low → high importance");
  }
  var norm = $("#heat-norm"), cbarLo = $("#cbar-lo"), cbarHi = $("#cbar-hi");
  var cbarTxt = cbarLo ? [cbarLo.textContent, cbarHi.textContent] : null;
  if (norm) norm.addEventListener("change", function () {
    var key = norm.checked ? "data-n" : "data-g";
    if (cbarTxt) {
      cbarLo.textContent = norm.checked ? "task min" : cbarTxt[0];
      cbarHi.textContent = norm.checked ? "task max" : cbarTxt[1];
    }
    $$("#imp-heat .hc").forEach(function (r) {
      r.setAttribute("fill", css(viridis(parseFloat(r.getAttribute(key)))));
    });
  });

  /* -- per-channel view ---------------------------------------------------------------------- */
  var ROW = 22, tasks = D.tasks;
  var layerSel = $("#layer-sel"), chSort = $("#ch-sort"), chCanvas = $("#ch-canvas");
  var chStats = $("#ch-stats");
  function drawChannels() {
    if (!chCanvas || !layerSel) return;
    var rec = D.ch[layerSel.value];
    var ctx = chCanvas.getContext("2d");
    if (!rec) {
      chCanvas.width = 1; chCanvas.height = ROW;
      chStats.textContent = "no per-channel importance for this layer";
      return;
    }
    var n = rec.n, T = tasks.length, vals = u8(rec.d);
    var order = [];
    for (var c = 0; c < n; c++) order.push(c);
    var by = chSort ? chSort.value : "";
    if (by !== "") {
      var key = function (c) {
        if (by === "*") {
          var s = 0, k = 0;
          for (var t = 0; t < T; t++) if (rec.has[t]) { s += vals[t * n + c]; k++; }
          return k ? s / k : 0;
        }
        return vals[parseInt(by, 10) * n + c];
      };
      order.sort(function (a, b) { return key(b) - key(a); });
    }
    var cw = Math.max(1, Math.min(12, Math.floor(1200 / n)));
    chCanvas.width = n * cw;
    chCanvas.height = (T + 1) * ROW;
    chCanvas.style.width = Math.min(1200, n * cw) + "px";
    chCanvas.style.height = (T + 1) * ROW + "px";
    ctx.fillStyle = "#f1f5f9";
    ctx.fillRect(0, 0, chCanvas.width, chCanvas.height);
    for (var t = 0; t < T; t++) {
      if (!rec.has[t]) continue;
      for (var i = 0; i < n; i++) {
        ctx.fillStyle = css(viridis(vals[t * n + order[i]] / 255));
        ctx.fillRect(i * cw, t * ROW + 1, cw, ROW - 2);
      }
    }
    for (var j = 0; j < n; j++) {
      var best = -1, bv = -1;
      for (var t2 = 0; t2 < T; t2++) {
        if (rec.has[t2] && vals[t2 * n + order[j]] > bv) { bv = vals[t2 * n + order[j]]; best = t2; }
      }
      if (best >= 0) {
        ctx.fillStyle = D.colours[tasks[best]];
        ctx.fillRect(j * cw, T * ROW + 4, cw, ROW - 8);
      }
    }
    chStats.textContent = n + " channels · colours " + fmt(rec.min) + " … " + fmt(rec.max) +
      " · mean " + tasks.map(function (t, i) {
        return t + " " + (rec.mean[i] === null ? "—" : rec.mean[i].toPrecision(4));
      }).join(" · ");
  }
  if (chCanvas) {
    chCanvas.addEventListener("mousemove", function (ev) {
      var rec = D.ch[layerSel.value];
      if (!rec) return;
      var r = chCanvas.getBoundingClientRect();
      var col = Math.floor((ev.clientX - r.left) / r.width * rec.n);
      chCanvas.setAttribute("data-tip", layerSel.value + "\nchannel position " + col +
        (chSort && chSort.value !== "" ? " (sorted)" : ""));
    });
  }

  /* -- evolution over epochs ------------------------------------------------------------------ */
  var E = D.evo;
  function drawEvoHeats() {
    var host = $("#evo-heats");
    if (!host || !E) return;
    var nl = E.layers.length, ne = E.epochs.length, html = [];
    Object.keys(E.tasks).forEach(function (t, i) {
      html.push('<div class="eh"><span class="dot" style="background:' + D.colours[t] +
        '"></span>' + esc(t) + ": mean importance per layer (x) and epoch (y)" +
        '<canvas id="evo-c' + i + '"></canvas></div>');
    });
    host.innerHTML = html.join("");
    Object.keys(E.tasks).forEach(function (t, i) {
      var c = document.getElementById("evo-c" + i), vals = u8(E.tasks[t].d);
      c.width = nl; c.height = ne;
      c.style.height = Math.max(24, Math.min(120, ne * 8)) + "px";
      var ctx = c.getContext("2d"), img = ctx.createImageData(nl, ne);
      for (var e = 0; e < ne; e++) for (var l = 0; l < nl; l++) {
        var rgb = viridis(vals[e * nl + l] / 255), p = (e * nl + l) * 4;
        img.data[p] = rgb[0]; img.data[p + 1] = rgb[1]; img.data[p + 2] = rgb[2];
        img.data[p + 3] = 255;
      }
      ctx.putImageData(img, 0, 0);
    });
  }
  function drawLayerEvo() {
    var host = $("#layer-evo");
    if (!host || !E || !layerSel) return;
    var per = E.by_layer[layerSel.value];
    if (!per) { host.innerHTML = ""; return; }
    var W = 420, H = 170, L = 48, R = 10, Tp = 22, B = 26, pw = W - L - R, ph = H - Tp - B;
    var xs = E.epochs, lo = Infinity, hi = -Infinity;
    Object.keys(per).forEach(function (t) {
      per[t].forEach(function (v) { if (v !== null) { lo = Math.min(lo, v); hi = Math.max(hi, v); } });
    });
    if (!isFinite(lo)) { host.innerHTML = ""; return; }
    if (hi <= lo) { hi = lo + (Math.abs(lo) || 1); }
    var x0 = xs[0], x1 = xs[xs.length - 1] > x0 ? xs[xs.length - 1] : x0 + 1;
    var dec = Math.min(8, Math.max(0, Math.ceil(-Math.log10((hi - lo) / 4))));
    var hiTxt = hi.toFixed(dec), loTxt = lo.toFixed(dec);
    L = Math.max(L, 10 + 6 * Math.max(hiTxt.length, loTxt.length));
    pw = W - L - R;
    var sx = function (x) { return L + (x - x0) / (x1 - x0) * pw; };
    var sy = function (y) { return Tp + ph - (y - lo) / (hi - lo) * ph; };
    var out = ['<svg class="chart" width="' + W + '" height="' + H + '" viewBox="0 0 ' + W + " " + H +
      '"><text class="ctitle" x="' + L + '" y="14">' + esc(layerSel.value) +
      ': mean importance per epoch</text><rect x="' + L + '" y="' + Tp + '" width="' + pw +
      '" height="' + ph + '" fill="none" stroke="#cbd5e1"/>' +
      '<text class="axl" x="' + (L - 4) + '" y="' + (Tp + 8) + '" text-anchor="end">' +
      hiTxt + '</text><text class="axl" x="' + (L - 4) + '" y="' + (Tp + ph) +
      '" text-anchor="end">' + loTxt + '</text><text class="axl" x="' + L + '" y="' + (H - 8) + '">' + String(x0) +
      '</text><text class="axl" x="' + (L + pw) + '" y="' + (H - 8) + '" text-anchor="end">epoch ' +
      String(xs[xs.length - 1]) + "</text>"];
    Object.keys(per).forEach(function (t) {
      var d = [];
      per[t].forEach(function (v, e) {
        if (v !== null) d.push((d.length ? "L" : "M") + sx(xs[e]).toFixed(1) + "," + sy(v).toFixed(1));
      });
      out.push('<path d="' + d.join(" ") + '" fill="none" stroke-width="2" stroke="' +
        D.colours[t] + '" data-tip="' + esc(t) + '"/>');
    });
    out.push("</svg>");
    host.innerHTML = out.join("");
  }
  if (layerSel) {
    layerSel.addEventListener("change", function () { drawChannels(); drawLayerEvo(); });
    if (chSort) chSort.addEventListener("change", drawChannels);
    drawChannels();
    drawLayerEvo();
  }
  drawEvoHeats();
  document.documentElement.setAttribute("data-ready", "1");
})();
