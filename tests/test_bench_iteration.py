"""benchmarks/bench_iteration.py runs its settings and reports what the README quotes (not the timings)."""
from __future__ import annotations

import json

from benchmarks import bench_iteration


def test_one_setting_reports_time_memory_and_the_config_it_timed():
    result = bench_iteration.measure("omniglot", "cpu", "batched", iterations=1, warmup=0)
    assert result["second_order"] is True and result["meta_batch"] == 8
    assert result["median_s_per_iter"] > 0 and result["median_cpu_s_per_iter"] > 0
    assert result["peak_memory_mb"] >= result["rss_before_mb"] > 0


def test_command_line_prints_each_setting_and_the_ratios(capsys):
    assert bench_iteration.main(["--configs", "omniglot", "--devices", "cpu", "--threads", "1",
                                 "--iterations", "1", "--warmup", "0"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line.get("variant") for line in lines] == ["loop", "batched", None]
    assert all(line["threads"] == 1 for line in lines[:2])
    summary = lines[2]
    assert summary["speedup_batched_vs_loop"] == lines[0]["median_s_per_iter"] / lines[1]["median_s_per_iter"]
    assert summary["peak_memory_ratio_batched_vs_loop"] > 0 and summary["cpu_time_ratio_batched_vs_loop"] > 0
