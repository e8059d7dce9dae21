"""Strategies are registered objects: a toy one registered here reaches the Hydra schema, the
sweep's checks, the planner and the plots with no edit anywhere else; and nothing outside a
strategy's own module compares strategy names."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import experiments.sweep.config as schema
from parallel import AttentionStrategy, get_strategy, strategy_names
from parallel.strategies import Strategy, register, unregister
from parallel.strategies.ulysses import Ulysses

REPO = Path(__file__).resolve().parent.parent


class Toy(Ulysses):
    """Ulysses under another name and colour: a new strategy that reuses a block."""

    name = "toy"
    summary = "a test strategy"
    use_when = "never"
    color = "#123456"
    baseline = False


@pytest.fixture
def toy(tmp_path, monkeypatch):
    register(Toy)
    schema.register_configs()
    conf = tmp_path / "conf"
    shutil.copytree(REPO / "conf", conf)
    (conf / "parallel" / "toy.yaml").write_text("strategy: toy\nactivation_checkpointing: true\n")
    import experiments.planner.estimate as estimate

    monkeypatch.setattr(estimate, "CONF_DIR", conf)
    estimate._strategy_preset.cache_clear()
    yield conf
    unregister("toy")
    schema.register_configs()
    estimate._strategy_preset.cache_clear()


def test_builtin_strategies_are_registered_in_order():
    assert strategy_names()[:5] == ("local", "ulysses", "fpdt", "ring", "usp")
    for name in strategy_names():
        spec = get_strategy(name)
        assert (REPO / "conf" / "parallel" / f"{name}.yaml").exists(), name
        assert spec.summary and spec.use_when and spec.color.startswith("#")
    assert [n for n in strategy_names() if get_strategy(n).takes_chunks] == ["fpdt"]


def test_a_duplicate_or_incomplete_strategy_is_refused():
    class Again(Ulysses):
        name = "fpdt"

    with pytest.raises(ValueError, match="already registered"):
        register(Again)

    class Nameless(Strategy):
        pass

    with pytest.raises(TypeError, match="must set the class attribute 'name'"):
        register(Nameless)


def test_a_registered_strategy_reaches_schema_sweep_planner_and_plots(toy):
    from experiments.figures.plots import strategy_color
    from experiments.planner.cli import plan_table
    from experiments.planner.estimate import estimate
    from experiments.sweep.points import check_point, resolve_point

    with initialize_config_dir(config_dir=str(toy), version_base="1.3"):
        cfg = compose("config", overrides=["model=llama-tiny", "parallel=toy", "gpus=2", "seq_len=64"])
        OmegaConf.to_object(cfg)  # the schema accepts the new name
        point = resolve_point(cfg)
        check_point(point)
        assert point.strategy == "toy" and point.chunks == 1
        with pytest.raises(Exception, match="parallel.strategy=toys"):  # a typo still fails at composition
            compose("config", overrides=["model=llama-tiny", "parallel=toy", "parallel.strategy=toys"])
        plan = compose("plan", overrides=["model=llama3-8b", "hardware=h100-sxm", "gpus=2", "strategies=[toy]"])
        assert "max seq_len toy" in plan_table(plan)
    # The planner models it by its degrees: the same numbers as the strategy it copies.
    mine = estimate("llama-tiny", "toy", 2, "h100-sxm", 8192)
    theirs = estimate("llama-tiny", "ulysses", 2, "h100-sxm", 8192)
    assert mine.device_peak == theirs.device_peak and mine.step_time_s == theirs.step_time_s
    assert strategy_color("toy") == "#123456"
    # And the model runs it.
    x = torch.randn(1, 16, 32)
    from parallel import AttentionWeights

    w = AttentionWeights.random(32, 4, 2, 8)
    torch.testing.assert_close(AttentionStrategy("toy")(x, w), AttentionStrategy("local")(x, w))


def test_the_plots_draw_a_strategy_in_its_registry_colour(toy, tmp_path):
    import matplotlib.colors as mcolors
    import matplotlib.pyplot as plt

    from experiments.figures.plots import plot_memory

    rows = [dict(model="m", strategy=s, chunks=1, gpus=2, seq_len=n, status="ok", device_mem_peak_gib=n / 1e4,
                 host_mem_gib=0.0) for s in ("toy", "ring") for n in (1024, 2048)]  # fmt: skip
    fig, ax = plt.subplots()
    plot_memory(rows, ax)
    colors = {mcolors.to_hex(line.get_color()) for line in ax.get_lines()}
    plt.close(fig)
    assert {"#123456", get_strategy("ring").color} <= colors


# A comparison with a quoted strategy name: ``== "fpdt"``, ``"ulysses" !=``, ``in ("local", ...)``.
_NAMES = "|".join(("local", "ulysses", "fpdt", "ring", "usp"))
_COMPARISON = re.compile(rf"""(==|!=|\bin)\s*[(\[{{]?\s*["']({_NAMES})["']|["']({_NAMES})["']\s*(==|!=|\bin\b)""")


def test_no_strategy_name_is_compared_outside_its_module():
    offenders = []
    for path in [*REPO.glob("parallel/**/*.py"), *REPO.glob("models/**/*.py"), *REPO.glob("experiments/**/*.py")]:
        own = path.parent.name == "strategies" and path.stem in strategy_names()
        if own:
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if _COMPARISON.search(line):
                offenders.append(f"{path.relative_to(REPO)}:{i}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
