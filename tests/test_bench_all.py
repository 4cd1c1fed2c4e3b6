"""`distvae bench all` (make bench): every bench's quick variant, the JSON and the BENCHMARKS.md section it writes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO

from distvae.bench.report import BEGIN, END, write_markdown

MACHINE = {"cores": 2, "cpu": "a CPU", "gpu": "none", "python": "3", "torch": "2", "accelerate": "1"}


def test_the_bench_section_is_replaced_and_the_recorded_sections_kept(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\nIntro.\n\n## Recorded by hand\n\nkept\n")
    write_markdown(path, MACHINE, {"data": ("distvae bench data", "round 1/5 done at 3 s\ntable row 1\n", 3.0)}, 60)
    first = path.read_text()
    assert first.index("Intro.") < first.index(BEGIN) < first.index("table row 1") < first.index(END) < \
        first.index("## Recorded by hand")
    assert "round 1/5" not in first  # progress lines are left out
    write_markdown(path, MACHINE, {"data": ("distvae bench data", "table row 2\n", 3.0)}, 60)
    second = path.read_text()
    assert "table row 2" in second and "table row 1" not in second and second.count(BEGIN) == 1
    assert second.endswith("## Recorded by hand\n\nkept\n")


@pytest.mark.slow
def test_bench_all_quick_runs_every_bench_and_writes_what_it_measured(tmp_path):
    markdown, out = tmp_path / "BENCHMARKS.md", tmp_path / "all.json"
    markdown.write_text((REPO / "BENCHMARKS.md").read_text())
    result = subprocess.run([sys.executable, "-m", "distvae", "bench", "all", "--quick", "--json", str(out),
                             "--markdown", str(markdown)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report, text = json.loads(out.read_text()), markdown.read_text()
    assert {"machine", "data", "step", "resume", "e2e"} <= set(report)
    assert {"npy", "jpeg_pipe"} <= set(report["resume"]) and "jpeg" not in report["resume"]
    for kind in ("npy", "jpeg_pipe"):
        entry = report["resume"][kind]
        assert entry["speedup"] == pytest.approx(entry["read_through"]["seconds"] / entry["resume"]["seconds"])
        assert f"resume {kind}: batch {entry['batch_index']} of the epoch" in text
    e2e = report["e2e"]
    assert e2e["ratio"] == pytest.approx(e2e["distvae"]["images_per_second"] / e2e["tutorial"]["images_per_second"])
    assert all(len(e2e[way]["per_round"]) == 2 and e2e[way]["peak_rss_mib"] > 0 for way in ("tutorial", "distvae"))
    assert "e2e: distvae" in text and "against the tutorial loop's" in text
    assert "distvae_loop" in text and "what would help most" in text  # the step bench's table and verdicts
    assert "images/s per core" in text  # the data bench's table
    assert "## The epoch boundary" in text  # the sections recorded by hand are kept


@pytest.mark.slow
def test_resume_bench_on_local_jpeg_shards_finds_the_batch_reading_through_gives(tmp_path):
    """The kind make bench leaves out: random access to original JPEGs, still a resume and still the same batch."""
    from distvae.bench.resume import bench_resume

    report = bench_resume(quick=True, kinds=("jpeg",), json_path=str(tmp_path / "resume.json"))
    entry = report["jpeg"]
    assert set(report) == {"settings", "jpeg"} and entry["batch_index"] > 0
    assert entry["speedup"] == pytest.approx(entry["read_through"]["seconds"] / entry["resume"]["seconds"])
    assert json.loads((tmp_path / "resume.json").read_text())["jpeg"]["batch_index"] == entry["batch_index"]
