"""benchmarks/bench_iteration.py runs its settings and reports what docs/PERFORMANCE.md quotes (not the timings)."""
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
    assert [(line.get("variant"), line.get("shapes")) for line in lines] == [
        ("loop", "config"), ("batched", "config"), ("loop", "dispatch"), ("batched", "dispatch"), (None, None)]
    assert all(line["threads"] == 1 for line in lines[:4])
    summary = lines[4]
    assert summary["speedup_batched_vs_loop"] == lines[0]["median_s_per_iter"] / lines[1]["median_s_per_iter"]
    assert summary["peak_memory_ratio_batched_vs_loop"] > 0 and summary["cpu_time_ratio_batched_vs_loop"] > 0
    assert summary["dispatch_s_per_iter_loop"] == lines[2]["median_s_per_iter"]
    # The loop issues each task's operations; the batched path issues them once for all 8 tasks.
    assert lines[2]["aten_calls_per_iter"] > 3 * lines[3]["aten_calls_per_iter"] > 0
    assert summary["aten_call_ratio_batched_vs_loop"] == lines[2]["aten_calls_per_iter"] / lines[3]["aten_calls_per_iter"]
    assert summary["dispatch_share_batched"] == lines[3]["median_s_per_iter"] / lines[1]["median_s_per_iter"]
    arithmetic = lines[1]["median_s_per_iter"] - lines[3]["median_s_per_iter"]
    assert summary["speedup_bound_batched_vs_loop"] == lines[0]["median_s_per_iter"] / max(arithmetic, 1e-12)
    loop_arithmetic = lines[0]["median_s_per_iter"] - lines[2]["median_s_per_iter"]
    assert summary["speedup_bound_ideal_vs_loop"] == lines[0]["median_s_per_iter"] / max(loop_arithmetic, 1e-12)


def test_set_changes_the_config_of_every_setting_and_its_worker_process(capsys):
    """`--set` reaches the subprocess that times each setting, and the lines say what was set."""
    assert bench_iteration.main(["--configs", "omniglot", "--devices", "cpu", "--threads", "1", "--variants",
                                 "batched", "--no-dispatch", "--iterations", "1", "--warmup", "0",
                                 "--set", "batch_size=2", "cnn_num_filters=8"]) == 0
    setting, summary = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert setting["meta_batch"] == 2 and setting["filters"] == 8
    assert setting["set"] == summary["set"] == {"batch_size": "2", "cnn_num_filters": "8"}


def test_set_with_a_bad_key_value_or_form_stops_before_timing_anything(capsys):
    import pytest
    for assignment, message in [("batch_sise=2", "batch_sise"), ("batch_size=two", "batch_size"),
                                ("batch_size", "expected KEY=VALUE")]:
        with pytest.raises(SystemExit):
            bench_iteration.main(["--configs", "omniglot", "--devices", "cpu", "--set", assignment])
        captured = capsys.readouterr()
        assert message in captured.err and captured.out == ""


def test_dispatch_shapes_keep_the_operations_and_shrink_the_arithmetic():
    """The dispatch setting must run the same operations as the config (same steps, tasks, stages, order),
    only on tensors small enough that their arithmetic is negligible."""
    real = bench_iteration.measure("omniglot", "cpu", "batched", iterations=1, warmup=0, count_operations=True)
    dispatch = bench_iteration.measure("omniglot", "cpu", "batched", iterations=1, warmup=0, dispatch_shapes=True)
    assert dispatch["shapes"] == "dispatch" and real["shapes"] == "config"
    assert dispatch["second_order"] is real["second_order"] and dispatch["meta_batch"] == real["meta_batch"]
    # Kernel choices may differ with the shapes (16,252 calls against 16,341 here); the meta-learner's may not.
    real_calls, dispatch_calls = real["aten_calls_per_iter"], dispatch["aten_calls_per_iter"]
    assert abs(dispatch_calls - real_calls) <= 0.02 * real_calls
    assert dispatch["median_s_per_iter"] < real["median_s_per_iter"]


def test_dispatch_bounds_on_the_cpu_and_cuda():
    results = {"loop": {"median_s_per_iter": 1.0}, "batched": {"median_s_per_iter": 0.8}}
    dispatch = {"loop": {"median_s_per_iter": 0.3}, "batched": {"median_s_per_iter": 0.1}}
    cpu = bench_iteration.dispatch_bounds(results, dispatch, "loop", "cpu")
    assert cpu["speedup_bound_batched_vs_loop"] == 1.0 / (0.8 - 0.1)
    assert cpu["speedup_bound_ideal_vs_loop"] == 1.0 / (1.0 - 0.3)
    assert cpu["dispatch_share_loop"] == 0.3 and cpu["dispatch_share_batched"] == 0.1 / 0.8
    cuda = bench_iteration.dispatch_bounds(results, dispatch, "loop", "cuda")
    assert not any(key.startswith("speedup_bound") for key in cuda) and cuda["dispatch_s_per_iter_batched"] == 0.1


def test_resnet12_setting_times_both_orders():
    """At the dispatch shapes (widths 4, 16x16): the ResNet-12 config, first and second order."""
    assert bench_iteration.DEFAULT_ORDERS["resnet12"] == ("second", "first")
    results = {order: bench_iteration.measure("resnet12", "cpu", "batched", iterations=1, warmup=0,
                                              dispatch_shapes=True, order=order) for order in ("second", "first")}
    for order, result in results.items():
        assert result["config"] == "resnet12" and result["meta_batch"] == 4
        assert result["second_order"] is (order == "second")
        assert result["median_s_per_iter"] > 0 and result["peak_memory_mb"] >= result["rss_before_mb"] > 0
    # Second order differentiates through every inner step's gradient: far more operations.
    assert results["second"]["aten_calls_per_iter"] > 1.3 * results["first"]["aten_calls_per_iter"]


def test_command_line_times_each_order_with_its_own_summary(capsys):
    assert bench_iteration.main(["--configs", "omniglot", "--devices", "cpu", "--threads", "1", "--orders",
                                 "first", "second", "--variants", "batched", "--no-dispatch",
                                 "--iterations", "1", "--warmup", "0"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(line.get("variant"), line.get("summary"), line["second_order"]) for line in lines] == [
        ("batched", None, False), (None, True, False), ("batched", None, True), (None, True, True)]


FAKE_PARSER = '''
import json, sys, torch

class Bunch:
    def __init__(self, entries):
        self.__dict__.update(entries)

def get_args():
    entries = json.load(open(sys.argv[sys.argv.index("--name_of_args_json_file") + 1]))
    entries["use_cuda"] = torch.cuda.is_available()
    return Bunch(entries), torch.device("cpu")
'''
FAKE_SYSTEM = '''
import torch

class MAMLFewShotClassifier(torch.nn.Module):
    """The official interface: tasks x classes x samples x C x H x W in, a dict of losses out."""
    def __init__(self, im_shape, device, args):
        super().__init__()
        self.args = args

    def run_train_iter(self, data_batch, epoch, current_iter):
        support_images, query_images, support_labels, query_labels = data_batch
        a = self.args
        assert support_images.shape == (a.batch_size, a.num_classes_per_set, a.num_samples_per_class,
                                         a.image_channels, a.image_height, a.image_width)
        assert query_labels.shape == (a.batch_size, a.num_classes_per_set, a.num_target_samples)
        assert a.second_order is True
        return {"loss": query_images.mean()}, None
'''


def fake_official_repo(root):
    """The official code's entry points as bench_official.py calls them, without the official arithmetic."""
    (root / "utils").mkdir(parents=True)
    (root / "utils" / "__init__.py").write_text("")
    (root / "utils" / "parser_utils.py").write_text(FAKE_PARSER)
    (root / "few_shot_learning_system.py").write_text(FAKE_SYSTEM)
    return root


def test_official_code_is_timed_first_and_every_ratio_is_a_median_over_rounds(tmp_path, capsys):
    official = fake_official_repo(tmp_path / "official")
    assert bench_iteration.main(["--configs", "omniglot", "--devices", "cpu", "--threads", "1", "--variants",
                                 "batched", "--no-dispatch", "--iterations", "1", "--warmup", "0",
                                 "--official-repo", str(official), "--rounds", "2"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line.get("variant") for line in lines] == ["official", "batched", "official", "batched", None]
    assert lines[0]["threads"] == 1 and lines[0]["meta_batch"] == 8 and lines[0]["second_order"] is True
    summary = lines[-1]
    assert summary["rounds"] == 2
    ratios = [lines[i]["median_s_per_iter"] / lines[i + 1]["median_s_per_iter"] for i in (0, 2)]
    assert summary["speedup_batched_vs_official"] == sum(ratios) / 2  # the median of two


def test_official_repo_that_is_not_one_is_refused_with_the_clone_command(tmp_path, capsys):
    import pytest
    with pytest.raises(SystemExit):
        bench_iteration.main(["--configs", "omniglot", "--official-repo", str(tmp_path)])
    assert "git clone https://github.com/shlee625/CxGrad" in capsys.readouterr().err
