// MathJax 2.7, bundled with the site (scripts/mkdocs_mathjax.py): formulas render offline.
// pymdownx.arithmatex (generic) wraps math in <span class="arithmatex">\( ... \)</span>.
window.MathJax = {
  config: ["TeX-AMS-MML_HTMLorMML-full.js"],
  tex2jax: {
    inlineMath: [["\\(", "\\)"]],
    displayMath: [["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true,
    processClass: "arithmatex",
    ignoreClass: ".*",
  },
  "HTML-CSS": { availableFonts: [], preferredFont: null, webFont: "STIX-Web", imageFont: null },
  showMathMenu: false,
  messageStyle: "none",
};
document$.subscribe(() => {
  if (window.MathJax && window.MathJax.Hub) { window.MathJax.Hub.Queue(["Typeset", window.MathJax.Hub]); }
});
