/* Sortable, filterable tables of the vitq-bench leaderboard: configures list.js (vendor/list.js).
   Each <div class="lb-list" data-values='["col", ...]'> holds an <input class="search">, <th class="sort"
   data-sort="col"> headers and a <tbody class="list"> whose cells carry class "col" and their sort
   value in data-v. Numbers sort numerically, everything else naturally; empty cells sort last. */
(function () {
  function num(v) { return v !== "" && v !== null && !isNaN(Number(v)) ? Number(v) : null; }
  document.querySelectorAll(".lb-list").forEach(function (el) {
    var names = JSON.parse(el.getAttribute("data-values"));
    var list = new List(el, {
      valueNames: names.map(function (n) { return { name: n, attr: "data-v" }; }),
      sortFunction: function (a, b, o) {
        var x = a.values()[o.valueName], y = b.values()[o.valueName];
        var desc = o.order === "desc" ? -1 : 1;
        if (x === "" || y === "") return x === y ? 0 : (x === "" ? 1 : -1) * desc;
        var nx = num(x), ny = num(y);
        if (nx !== null && ny !== null) return nx - ny;
        return list.utils.naturalSort.caseInsensitive(String(x), String(y));
      }
    });
    var count = el.querySelector(".count");
    if (count) {
      var show = function () { count.textContent = list.visibleItems.length + " / " + list.items.length + " rows"; };
      list.on("updated", show);
      show();
    }
  });
})();
