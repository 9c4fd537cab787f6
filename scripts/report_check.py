#!/usr/bin/env python3
"""Open the Snakemake HTML report in a real headless browser (Chromium) and check it renders: `make report-check`.

For the landing page and for every figure and HTML page the report embeds (opened as a reader would: the result
in the main pane, its caption in the side bar), Chromium loads a copy of the report with a small harness script added, and
this script checks that
  * no JavaScript error was raised and nothing was written to console.error (the harness records both), and
    Chromium's own log (--enable-logging=stderr) shows no console error either;
  * the report's app rendered (the side bar lists the result categories), each figure's <img> decoded
    (naturalWidth > 0) and each HTML page is in its frame, with its caption in the side bar.
A screenshot of each view is saved in --out (landing.png, then figure_<name>.png, page_<name>.png). Exit status 1 on any failure.

The copy (with the harness) is written beside the screenshots; the report itself is not modified.
"""
from __future__ import annotations

import argparse
import html
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--enable-logging=stderr", "--v=0",
                  # let the report's timers (React render, the harness's own waits) run before the capture
                  "--virtual-time-budget=15000"]

# Recorded from the first script on: uncaught errors, rejected promises, console.error. CSS transitions are switched
# off: headless Chromium's virtual time does not advance them, so a capture could show a colour half-way.
HARNESS_HEAD = """<style>* { transition: none !important; }</style>
<script>
window.__check = {errors: []};
window.addEventListener("error", e => __check.errors.push("error: " + e.message));
window.addEventListener("unhandledrejection", e => __check.errors.push("rejection: " + e.reason));
(orig => { console.error = (...a) => { __check.errors.push("console.error: " + a.join(" ")); orig(...a); }; })(
  console.error);
</script>"""

# After the app has rendered: open the view, wait, then publish what the checks need as JSON in a <pre>.
HARNESS_TAIL = """<script>
setTimeout(() => {
  try { VIEW } catch (e) { __check.errors.push("view: " + e); }
  setTimeout(() => {
    const img = [...document.images].find(i => window.__expected && i.src === __expected);
    __check.frame = [...document.querySelectorAll("iframe")].some(f => window.__expected && f.src === __expected);
    const nav = document.querySelector("nav");
    __check.image = img ? {width: img.naturalWidth, height: img.naturalHeight} : null;
    __check.nav = nav ? nav.innerText : "";
    const out = document.createElement("pre");
    out.id = "report-check";
    out.style.display = "none";
    out.textContent = JSON.stringify(__check);
    document.body.appendChild(out);
  }, 1500);
}, 1500);
</script>"""


# Inline HTML elements: a browser's innerText joins their text to the neighbouring text as is (`(<code>x</code>):`
# reads "(x):"); any other tag (paragraph, list item, line break) separates words.
INLINE_TAGS = {"a", "abbr", "b", "cite", "code", "em", "i", "kbd", "mark", "q", "s", "samp", "small", "span",
               "strong", "sub", "sup", "tt", "u", "var"}


def caption_text(markup: str) -> str:
    """A caption's HTML as the side bar's innerText reads it, whitespace collapsed: inline tags dropped, block tags
    a space (a space for every tag put spaces inside "(restore.layer):", which the page does not show)."""
    text = re.sub(r"</?([A-Za-z][\w-]*)\b[^>]*>",
                  lambda tag: "" if tag.group(1).lower() in INLINE_TAGS else " ", markup)
    text = re.sub(r"<[^>]*>", " ", text)  # comments, doctypes
    return " ".join(html.unescape(text).split())


def caption_shown(caption: str, nav: str) -> bool:
    """Whether the caption's beginning (its first 60 characters) is in the side bar's text."""
    return bool(caption) and caption[:60] in " ".join(nav.split())


def results_of(report: str) -> tuple[dict, dict]:
    """The report's embedded result table and categories (the JSON its app reads)."""
    found = {}
    for name in ("results", "categories"):
        match = re.search(rf'<script id="{name}">\s*var {name} = (.*?);\s*</script>', report, re.S)
        if not match:
            raise SystemExit(f"report-check: no `var {name}` in the report: not a Snakemake HTML report?")
        found[name] = json.loads(match.group(1))
    return found["results"], found["categories"]


def chromium(binary: str, url: str, *args: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run([binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args, url],
                              capture_output=True, text=True, timeout=180)


def console_errors(stderr: str) -> list[str]:
    """Console messages of level error in Chromium's log (`...:ERROR:CONSOLE(...)` or `... "Uncaught ...`)."""
    return [line for line in stderr.splitlines()
            if "CONSOLE" in line and ("ERROR:CONSOLE" in line or "Uncaught" in line)]


def check_view(binary: str, report: str, view_js: str, name: str, out: Path, size: str) -> dict:
    # the first <head> and the last </body> are the page's own (the embedded libraries hold such strings too)
    page = report.replace("<head>", "<head>" + HARNESS_HEAD, 1)
    body, end, rest = page.rpartition("</body>")
    page = body + HARNESS_TAIL.replace("VIEW", view_js) + end + rest
    harness = out / f".{name}.html"
    harness.write_text(page, encoding="utf-8")
    url = harness.resolve().as_uri()
    dom = chromium(binary, url, "--dump-dom")
    match = re.search(r'<pre id="report-check"[^>]*>(.*?)</pre>', dom.stdout, re.S)
    state = json.loads(html.unescape(match.group(1))) if match else {"errors": ["the harness never reported: "
                                                                               "the page did not finish rendering"]}
    shot = out / f"{name}.png"
    taken = chromium(binary, url, f"--screenshot={shot}", f"--window-size={size}")
    state["errors"] += console_errors(dom.stderr) + console_errors(taken.stderr)
    if not shot.exists():
        state["errors"].append(f"no screenshot written (chromium exit {taken.returncode}): {taken.stderr[-500:]}")
    state["screenshot"] = str(shot)
    harness.unlink()
    return state


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", help="the HTML report (snakemake --report results/report.html)")
    parser.add_argument("--out", required=True, help="folder for the screenshots")
    parser.add_argument("--window-size", default="1400,2000")
    args = parser.parse_args()
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        raise SystemExit("report-check: no chromium on PATH (make report-check installs Debian's chromium)")
    report = Path(args.report).read_text(encoding="utf-8")
    results, categories = results_of(report)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    failures = []
    landing = check_view(binary, report, "", "landing", out, args.window_size)
    missing = [c for c in categories if c not in landing.get("nav", "")]
    print(f"landing page: {landing['screenshot']}; categories in the side bar: {sorted(categories)}"
          + (f"; MISSING {missing}" if missing else ""))
    failures += [f"landing: {e}" for e in landing["errors"]] + [f"landing: category {c} not shown" for c in missing]

    # every result the report shows inline: figures (<img>) and HTML pages (in a frame, e.g. the headline table)
    shown_inline = {path: "img" if entry["mime_type"].startswith("image/") else "html"
                    for path, entry in results.items() if entry["mime_type"].startswith("image/")
                    or entry["mime_type"] == "text/html"}
    figures = [path for path, kind in shown_inline.items() if kind == "img"]
    for path in sorted(shown_inline):
        entry, kind = results[path], shown_inline[path]
        name = Path(path).stem
        # what the eye button beside a result does, plus its info (caption) in the side bar, in one state change
        view = (f"window.__expected = results[{json.dumps(path)}].data_uri; app.setView({{content: '{kind}', "
                f"contentPath: __expected, resultPath: {json.dumps(path)}, navbarMode: 'resultinfo'}});")
        state = check_view(binary, report, view, f"{'figure' if kind == 'img' else 'page'}_{name}", out,
                           args.window_size)
        caption = caption_text(entry["caption"])
        shown = caption_shown(caption, state.get("nav", ""))
        problems = list(state["errors"])
        if kind == "img" and (not state.get("image") or not state["image"]["width"]):
            problems.append("figure not decoded")
        if kind == "html" and not state.get("frame"):
            problems.append("page not shown in a frame")
        if not caption:
            problems.append("no caption")
        elif not shown:
            problems.append("caption not shown in the side bar")
        image = state.get("image") or {}
        size = f"{image.get('width')}x{image.get('height')} px" if kind == "img" else "HTML page in a frame"
        print(f"{path}: {size}, caption {len(caption)} chars"
              f"{' shown' if shown else ''}; {state['screenshot']}"
              + (f"; PROBLEMS {problems}" if problems else ""))
        failures += [f"{path}: {p}" for p in problems]
    if not figures:
        failures.append("the report embeds no figure")
    for failure in failures:
        print(f"FAIL {failure}", file=sys.stderr)
    print(f"report-check: {len(figures)} figure(s), {len(shown_inline) - len(figures)} HTML page(s), "
          f"{len(failures)} problem(s); screenshots in {out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
