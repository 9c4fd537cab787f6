"""scripts/report_check.py's caption comparison (`make report-check`; the browser run itself is not part of `make
test`). Issue 25, item 18: the captions of fig5, fig6 and fig7 begin with inline code, and the checker, which put a
space for every tag it stripped, read "( restore.layer ):" where the side bar shows "(restore.layer):", and failed a
correct report three times."""
import importlib.util
import re
import types

import jinja2
import pytest
import yaml
from docutils.core import publish_parts

from helpers import REPO

_spec = importlib.util.spec_from_file_location("report_check", REPO / "scripts" / "report_check.py")
report_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(report_check)


def rendered(figure: str) -> tuple[str, str]:
    """A figure's caption as Snakemake's report renders it (Jinja with the default config, then docutils' HTML
    body, as snakemake/report/__init__.py does), and the text a reader sees: the reStructuredText with the inline
    literals' backquotes dropped, whitespace collapsed (derived from the source, not from the HTML)."""
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    rst = jinja2.Template((REPO / "workflow" / "report" / f"{figure}.rst").read_text()).render(
        snakemake=types.SimpleNamespace(config=config))
    return publish_parts(rst, writer="html")["body"], " ".join(re.sub(r"``(.*?)``", r"\1", rst).split())


@pytest.mark.parametrize("figure", ["fig5", "fig6", "fig7"])
def test_a_caption_beginning_with_inline_code_is_found_in_the_side_bar(figure):
    markup, seen = rendered(figure)
    assert "docutils literal" in markup.split(":", 1)[0]  # the case at hand: inline code in the first words
    caption = report_check.caption_text(markup)
    assert caption == seen
    side_bar = f"results/figs/{figure}.png\n\n{seen[:70]}\n{seen[70:]}\n\nRule: {figure}"  # innerText: line breaks
    assert report_check.caption_shown(caption, side_bar)


def test_caption_text_reads_as_the_page_does():
    text = report_check.caption_text
    assert text('<p>Restoration (<tt class="docutils literal">restore.rank</tt>): top <em>k</em>.</p>') == \
        "Restoration (restore.rank): top k."
    assert text('<code><span class="pre">a</span> <span class="pre">b</span></code>') == "a b"
    assert text("<p>one</p><p>two</p><ul><li>three</li><li>four</li></ul>five<br/>six") == \
        "one two three four five six"  # block tags and line breaks separate words
    assert text("<p>a &lt;b&gt; &amp; c</p>") == "a <b> & c"  # escaped markup is text, not a tag


def test_a_caption_not_in_the_side_bar_is_reported():
    assert not report_check.caption_shown("Layer-wise restoration (restore.layer): ID", "Rank-wise restoration")
    assert not report_check.caption_shown("", "anything")
