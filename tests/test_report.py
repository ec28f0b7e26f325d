"""report.py: the page's content, and the page rendered in a real browser (headless
Debian Chromium, installed by .ci/run): it loads with no console message, its tables and
images are there and decoded, and its screenshot is not blank."""

import re
import shutil
import subprocess
from pathlib import Path

import matplotlib.image
import numpy as np
import pandas as pd
import pytest

import report
from prebias.common import UserError

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000"]
# the test's own probe, added to a copy of the page: counts the images the browser loaded with
# a size (a truncated PNG still passes here: it renders blank, which the screenshot check catches)
PROBE = ("<script>window.addEventListener('load', () => { const im = [...document.images]; "
         "document.body.setAttribute('data-images', im.length + '/' + im.filter(i => i.complete && "
         "i.naturalWidth > 0).length); });</script></body>")


def chromium(page: Path, tmp: Path, *args) -> tuple[str, list[str]]:
    """(stdout, console lines) of headless Chromium on a file:// page."""
    r = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp / 'profile'}", *args, page.resolve().as_uri()],
                       capture_output=True, text=True, timeout=120)
    console = [line for line in r.stderr.splitlines() if ":CONSOLE" in line]
    return r.stdout, console


@pytest.fixture(scope="module")
def experiment_page(tiny_experiment, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "tiny.html"
    report.main([str(tiny_experiment.dir), f"--out={out}", "--steps=0,14,79", "--chars=0"])
    return out


def test_page_content(experiment_page, tiny_experiment):
    text = experiment_page.read_text()
    assert "Does sorting batches by readability change the tiny model?" in text
    assert text.count("<img ") == 4 and text.count("data:image/png;base64,") == 4
    assert "http://" not in text.replace("http://www.w3.org", "") and "https://" not in text  # nothing fetched
    # the end-of-run result: the final.csv means, per arm
    final = pd.read_csv(tiny_experiment.dir / "tables" / "final.csv").set_index(["metric", "arm"])
    assert f"{final.loc[('val_loss', 'curriculum'), 'mean']:.4g} [" in text
    # each run's config and commit; the viewer shows step 14's ids of the first seed, with the canary
    for arm in ("shuffle", "curriculum"):
        ids = np.load(tiny_experiment.dir / arm / "seed1" / "batch_ids.npy")[14]
        section = text[text.index(f"{arm} / seed 1"):]
        step = section[section.index("step 14:"):section.index("</details>", section.index("step 14:"))]
        assert [int(i) for i in re.findall(r"<tr><td class=\"\">\d+</td><td class=\"\">(\d+)</td>", step)] == \
            ids.tolist()
    assert "the secret number is" in text and re.search(r"tag 0 (inserted|replaced) at token \d+", text)
    commit = pd.read_csv(tiny_experiment.dir / "tables" / "runs.csv")["commit"].iloc[0]
    assert commit in text


def test_single_run_page(tiny_run, tmp_path):
    out = tmp_path / "run.html"
    report.main([str(tiny_run.out_dir), f"--out={out}", "--steps=3"])
    text = out.read_text()
    assert "step 3: 8 batches (trained at step 3" in text and "config (train.py)" in text


def test_not_a_run(tmp_path):
    with pytest.raises(UserError, match="neither an experiment"):
        report.main([str(tmp_path)])
    assert not (tmp_path / "report.html").exists()


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_console_capture_sees_errors(tmp_path):
    """The check below would catch a script error: a page with one is caught."""
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><p>x</p><script>console.error('boom'); missing();</script></body></html>")
    _, console = chromium(bad, tmp_path, "--dump-dom")
    assert any("boom" in c for c in console) and any("missing is not defined" in c for c in console)


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
@pytest.mark.slow
def test_page_in_a_real_browser(experiment_page, tmp_path):
    page = experiment_page.read_text()
    csp = re.search(r'<meta http-equiv="Content-Security-Policy" content="[^"]+">', page).group(0)
    blocked = tmp_path / "blocked.html"  # a script slipped into the page does not run: the policy blocks it
    blocked.write_text(page.replace("</body>", PROBE))
    dom, console = chromium(blocked, tmp_path, "--dump-dom")
    assert any("violates the following Content Security Policy" in c for c in console) and 'data-images="' not in dom
    probed = tmp_path / "probed.html"  # the test's own probe runs on a copy without the policy
    probed.write_text(page.replace(csp, "").replace("</body>", PROBE))
    dom, console = chromium(probed, tmp_path, "--dump-dom")
    assert console == [], console  # the page itself logs nothing: no error, no failed resource
    assert 'data-images="4/4"' in dom  # four figures, all decoded
    assert dom.count("<table>") >= 8 and "Difference from shuffle" in dom
    shot = tmp_path / "shot.png"
    _, console = chromium(experiment_page, tmp_path, f"--screenshot={shot}", "--window-size=1280,2400")
    assert console == [], console
    im = matplotlib.image.imread(shot)
    assert im.shape[:2] == (2400, 1280)
    dark = (im[..., :3].mean(axis=2) < 0.5).mean()  # share of dark pixels: text, lines, plots
    assert 0.01 < dark < 0.5 and im.std() > 0.1
