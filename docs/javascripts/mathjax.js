// MathJax 3 for the Markdown pages (pymdownx.arithmatex, generic mode: \( \) and \[ \]) and the
// notebook pages (mkdocs-jupyter leaves $ and $$ in the HTML); code blocks are skipped.
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"], ["$", "$"]],
    displayMath: [["\\[", "\\]"], ["$$", "$$"]],
    processEscapes: true,
    processEnvironments: true,
  },
};

if (typeof document$ !== "undefined") {
  // re-typeset after Material's instant navigation swaps the page
  document$.subscribe(() => {
    if (window.MathJax && MathJax.typesetPromise) {
      MathJax.typesetPromise();
    }
  });
}
