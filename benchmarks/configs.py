"""The experiment configs whose shapes the iteration benchmarks time (bench_iteration.py, bench_official.py)."""
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CONFIGS = {
    "omniglot": REPO / "experiment_config/omniglot_5way_1shot/CxGrad_4conv.yaml",
    "omniglot_cpu": REPO / "experiment_config/omniglot_5way_1shot/CxGrad_4conv_cpu.yaml",
    "mini_imagenet": REPO / "experiment_config/mini_imagenet_5way_1shot/CxGrad_4conv.json",
    "resnet12": REPO / "experiment_config/mini_imagenet_5way_1shot/CxGrad_resnet12.yaml",
}
