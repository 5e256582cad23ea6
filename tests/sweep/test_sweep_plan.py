"""Sweep files: grid expansion, names, budgets, data fractions, validation, status, emitted commands."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from vaemo_dist.config import load_config
from vaemo_dist.data.shards import expand_shards
from vaemo_dist.model.flops import account
from vaemo_dist.sweep.plan import (
    STATUS_FILE,
    SweepError,
    build_points,
    changed_keys,
    compact_shards,
    format_commands,
    format_number,
    load_spec,
    override_value,
    point_status,
    read_manifest,
    slurm_script,
    statuses,
    steps_for_budget,
    write_manifest,
)


def test_grid_expands_in_file_order_with_readable_names(write_sweep):
    spec = load_spec(write_sweep(grid={"preset": ["tiny", "small"], "flops": [2.5e11, 1e12], "seed": [0, 1]}))
    points = build_points(spec)
    assert [p.name for p in points] == [
        "tiny-f2.5e11-s0", "tiny-f2.5e11-s1", "tiny-f1e12-s0", "tiny-f1e12-s1",
        "small-f2.5e11-s0", "small-f2.5e11-s1", "small-f1e12-s0", "small-f1e12-s1",
    ]
    assert [p.index for p in points] == list(range(8))
    p = points[5]
    assert (p.preset, p.model_preset, p.seed, p.flops_budget) == ("small", "small", 1, 2.5e11)
    assert "model.preset=small" in p.overrides and "train.seed=1" in p.overrides
    assert p.overrides[-2:] == [f"train.out_dir={spec.out_dir}", "train.run_name=small-f2.5e11-s1"]
    # The overrides are exactly what the launcher will load.
    cfg = load_config(spec.config, p.overrides)
    assert (cfg.model.dim, cfg.train.seed, cfg.train.steps, cfg.inputs.video.size) == (384, 1, p.steps, 64)


def test_budget_becomes_steps_from_flops_per_sample_and_global_batch(write_sweep):
    overrides = {"inputs.video.size": 64, "data.batch_size": 4, "train.grad_accum": 3}
    spec = load_spec(write_sweep(launch={"nproc": 2}, overrides=overrides,
                                 grid={"preset": ["tiny"], "flops": [1e12]}))
    (p,) = build_points(spec)
    cfg = load_config(spec.config, p.overrides)
    fps = account(cfg.model, cfg.inputs).train_flops
    assert p.flops_per_sample == fps and p.global_batch == 4 * 3 * 2
    assert p.steps == round(1e12 / (fps * 24)) == steps_for_budget(1e12, fps, 24)
    assert p.flops_planned == p.steps * 24 * fps
    assert abs(p.flops_planned - 1e12) <= fps * 24 / 2  # the nearest whole step
    assert p.params == account(cfg.model, cfg.inputs).params


def test_steps_for_budget_rounds_and_never_returns_zero():
    assert steps_for_budget(1000.0, 10.0, 8) == 12  # 12.5 -> 12 (banker's rounding is fine)
    assert steps_for_budget(1001.0, 10.0, 8) == 13
    assert steps_for_budget(1.0, 10.0, 8) == 1


def test_budget_given_as_yaml_string_and_steps_axis(tmp_path):
    base = Path(__file__).resolve().parents[2] / "configs" / "stage1" / "tiny.yaml"
    path = tmp_path / "s.yaml"
    path.write_text(f"config: {base}\nout_dir: {tmp_path}/o\ngrid:\n  flops: [2e12]\n")  # YAML 1.1: a string
    (p,) = build_points(load_spec(path))
    assert p.flops_budget == 2e12 and p.name == "tiny-f2e12-s0"
    path.write_text(f"config: {base}\nout_dir: {tmp_path}/o\n"
                    "grid:\n  train.steps: [7]\n  optim.lr: [1.0e-3]\n")
    (p,) = build_points(load_spec(path))
    assert p.name == "tiny-n7-lr0.001-s0" and p.flops_budget is None
    assert "train.steps=7" in p.overrides and "optim.lr=0.001" in p.overrides
    assert p.flops_planned == 7 * p.global_batch * p.flops_per_sample


def test_no_budget_in_the_grid_uses_the_config_steps(write_sweep):
    (p,) = build_points(load_spec(write_sweep(grid={"seed": [3]})))
    assert p.name == "tiny-n120-s3" and p.steps == 120  # configs/stage1/tiny.yaml


def test_named_presets_bundle_overrides(write_sweep):
    spec = load_spec(write_sweep(presets={"tiny-d1": {"model.preset": "tiny", "model.depth": 1}},
                                 grid={"preset": ["tiny", "tiny-d1"], "steps": [5]}))
    tiny, shallow = build_points(spec)
    assert shallow.name == "tiny-d1-n5-s0" and shallow.preset == "tiny-d1" and shallow.model_preset == "tiny"
    assert "model.depth=1" in shallow.overrides
    assert shallow.params < tiny.params and shallow.flops_per_sample < tiny.flops_per_sample


def test_data_fraction_of_the_synthetic_corpus_keeps_its_first_shards(write_sweep, tmp_path):
    synth = tmp_path / "corpus-not-built-yet"
    spec = load_spec(write_sweep(overrides={"data.synth.dir": str(synth)},
                                 grid={"data_fraction": [0.25, 1.0], "steps": [5]}))
    quarter, full = build_points(spec)
    assert quarter.name == "tiny-d0.25-n5-s0" and full.name == "tiny-d1-n5-s0"
    assert f"data.shards={synth}/shard-{{000000..000003}}.tar" in quarter.overrides
    assert (quarter.data_shards, quarter.data_clips) == (4, 64)  # 256 clips, 16 per shard
    assert not any(o.startswith("data.shards=") for o in full.overrides)  # the launcher builds the corpus
    assert (full.data_shards, full.data_clips) == (16, 256)


def test_data_fraction_of_real_shards_reads_the_manifest(write_sweep, tiny_corpus):
    spec = load_spec(write_sweep(overrides={"data.shards": str(tiny_corpus)},
                                 grid={"data_fraction": [0.5], "steps": [5]}))
    (p,) = build_points(spec)
    (shards,) = [o.split("=", 1)[1] for o in p.overrides if o.startswith("data.shards=")]
    assert expand_shards(shards) == expand_shards(str(tiny_corpus))[:2]  # ceil(0.5 x 3)
    assert (p.data_shards, p.data_clips) == (2, 10)  # shards of 5, 5 and 2 clips


def test_compact_shards():
    assert compact_shards(["a/s-0007.tar"]) == "a/s-0007.tar"
    assert compact_shards([f"s3://b/t-{i:06d}.tar" for i in range(3, 6)]) == "s3://b/t-{000003..000005}.tar"
    assert compact_shards(["x/a-1.tar", "x/a-3.tar"]) == "x/a-1.tar,x/a-3.tar"
    assert compact_shards(["x/a.tar", "x/b.tar"]) == "x/a.tar,x/b.tar"


def test_override_values_read_back_as_written():
    for value in ["synthetic", "1e-3", "true", "{a}", "a b", 3, 0.001, True, [0.9, 0.95]]:
        text = override_value(value)
        assert yaml.safe_load(text) == value, (value, text)
    assert format_number(2.5e11) == "2.5e11" and format_number(1e-5) == "1e-5" and format_number(40) == "40"


@pytest.mark.parametrize("fields, message", [
    ({"gird": {}}, "unknown sweep key 'gird'. Did you mean 'grid'?"),
    ({"launch": {"nprocs": 2}}, "unknown sweep key 'launch.nprocs'. Did you mean 'nproc'?"),
    ({"launch": {"nproc": 0}}, "launch.nproc: expected a positive integer"),
    ({"grid": {"budget_flop": [1e12]}}, "unknown grid axis 'grid.budget_flop'"),
    ({"grid": {"flops": ["lots"]}}, "grid.flops[0]: expected a positive number of training FLOPs"),
    ({"grid": {"flops": [1e12], "steps": [5]}}, "either as flops or as steps"),
    ({"grid": {"preset": ["tiny", "tinyy"]}}, "grid.preset[1]: 'tinyy' is neither a model preset"),
    ({"grid": {"data_fraction": [1.5]}}, "grid.data_fraction[0]: expected a fraction in (0, 1]"),
    ({"grid": {"seed": []}}, "grid.seed: expected a non-empty list"),
    ({"grid": {"seed": [0, 0]}}, "grid.seed: repeated values"),
    ({"grid": {"train.run_name": ["x"]}}, "grid.train.run_name: set by the sweep"),
    ({"overrides": {"depth": 3}}, "overrides.depth: expected a dotted config key"),
    ({"presets": {"tiny": {"model.depth": 1}}}, "presets.tiny: shadows the built-in model preset"),
    ({"overrides": {"train.steps": 5}, "grid": {"flops": [1e12]}}, "overrides.train.steps: the grid gives"),
    ({"config": "nowhere.yaml"}, "config: "),
])
def test_bad_sweep_files_are_named(write_sweep, fields, message):
    with pytest.raises(SweepError) as e:
        load_spec(write_sweep(**fields))
    assert message in str(e.value)


@pytest.mark.parametrize("fields, message", [
    ({"overrides": {"optim.lrr": 1.0}}, "overrides: unknown config key 'optim.lrr'. Did you mean 'lr'?"),
    ({"grid": {"model.dpth": [2, 3]}}, "grid point 0 (model.dpth=2): unknown config key 'model.dpth'"),
    ({"grid": {"steps": [3]}, "overrides": {"train.stop_at": 5}},
     "train.stop_at: 5 must be in [0, train.steps=3]"),
    ({"grid": {"steps": [3, 4]}, "overrides": {"data.global_batch_size": 6}}, "data.global_batch_size"),
    ({"grid": {"optim.lr": [0.001, 1.0e-3]}}, "grid.optim.lr: repeated values"),
    ({"grid": {"model.depth": [2], "model.decoder_depth": [2]},
      "presets": {}, "overrides": {"data.batch_size": 4}}, None),
])
def test_bad_config_keys_fail_when_points_are_built(write_sweep, fields, message):
    spec_path = write_sweep(**fields)
    if message is None:  # two axes whose short names differ still build
        assert build_points(load_spec(spec_path))[0].name == "tiny-n120-depth2-decoder_depth2-s0"
        return
    with pytest.raises(SweepError) as e:
        build_points(load_spec(spec_path))
    assert message in str(e.value)


def test_points_that_would_share_a_folder_are_refused(write_sweep):
    spec = load_spec(write_sweep(grid={"model.depth": [2], "model.extra.depth": [2]}))
    with pytest.raises(SweepError):  # model.extra is no config section: refused before naming
        build_points(spec)
    spec = load_spec(write_sweep(grid={"optim.lr": [0.0010001, 0.0010002]}))
    with pytest.raises(SweepError, match="get the same name 'tiny-n120-lr0.001-s0'"):
        build_points(spec)


def _fake_run(folder: Path, step: int | None, returncode: int | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if step is not None:
        (folder / "checkpoints").mkdir(exist_ok=True)
        (folder / "checkpoints" / "latest").write_text(f"step_{step:08d}")
    if returncode is not None:
        (folder / STATUS_FILE).write_text(json.dumps({"returncode": returncode}))


def test_status_from_the_run_folder(tmp_path):
    assert point_status(tmp_path / "absent", 10).state == "new"
    _fake_run(tmp_path / "empty", None)
    assert point_status(tmp_path / "empty", 10).state == "new"
    _fake_run(tmp_path / "half", 4)
    half = point_status(tmp_path / "half", 10)
    assert (half.state, half.step) == ("interrupted", 4)
    _fake_run(tmp_path / "full", 10)
    assert point_status(tmp_path / "full", 10).state == "done"
    _fake_run(tmp_path / "crashed", 4, returncode=1)
    assert point_status(tmp_path / "crashed", 10).state == "failed"
    _fake_run(tmp_path / "crashed-late", 10, returncode=1)  # a crash after the last checkpoint: still done
    assert point_status(tmp_path / "crashed-late", 10).state == "done"
    _fake_run(tmp_path / "stopped", 4, returncode=0)  # train.stop_at: resumable, not failed
    assert point_status(tmp_path / "stopped", 10).state == "interrupted"


@pytest.fixture
def three_states(write_sweep):
    spec = load_spec(write_sweep(launch={"nproc": 2, "env": {"OMP_NUM_THREADS": 1}},
                                 grid={"preset": ["tiny"], "steps": [4, 8, 12]}))
    points = build_points(spec)
    _fake_run(Path(spec.out_dir) / points[0].name, 4)  # done
    _fake_run(Path(spec.out_dir) / points[1].name, 4)  # interrupted
    return spec, points, statuses(spec, points)


def test_commands_comment_out_done_points(three_states):
    spec, points, states = three_states
    assert [s.state for s in states] == ["done", "interrupted", "new"]
    text = format_commands(spec, points, states)
    lines = text.splitlines()
    assert "# [1/3] tiny-n4-s0: done (step 4/4)" in lines
    assert "# [2/3] tiny-n8-s0: interrupted (checkpoint at step 4/8)" in lines
    assert "# [3/3] tiny-n12-s0: new" in lines
    runnable = [ln for ln in lines if not ln.startswith("#")]
    assert len(runnable) == 2 and any(ln.startswith("# OMP_NUM_THREADS=1 deepspeed") for ln in lines)
    for line, p in zip(runnable, points[1:]):
        argv = shlex.split(line)
        assert argv[:8] == ["OMP_NUM_THREADS=1", "deepspeed", "--num_gpus", "2", "launchers/stage1.py",
                            "--config", spec.config, "--resume"]
        assert argv[8] == "latest" and argv[9:] == p.overrides


def test_slurm_array_runs_only_points_not_done(three_states):
    spec, points, states = three_states
    script = slurm_script(spec, points, states)
    assert "#SBATCH --array=1,2\n" in script and "#SBATCH --gpus-per-node=2\n" in script
    assert "#SBATCH --requeue" in script and "#   0: tiny-n4-s0  done (step 4/4)" in script
    assert f"  1) ARGS=({shlex.join(points[1].overrides)}) ;;  # tiny-n8-s0" in script
    assert "launchers/stage1.py --config" in script and '--resume latest "${ARGS[@]}"' in script
    assert "export OMP_NUM_THREADS=1\n" in script and "OMP_NUM_THREADS=8" not in script  # launch.env wins
    if shutil.which("bash"):
        subprocess.run(["bash", "-n"], input=script, text=True, check=True)
        # The case statement yields the point's overrides as separate words.
        probe = script.split("set -euo pipefail", 1)[1].split("export MASTER_ADDR", 1)[0]
        out = subprocess.run(["bash", "-c", probe + 'printf "%s\\n" "${ARGS[@]}"'], text=True,
                             capture_output=True, env={"SLURM_ARRAY_TASK_ID": "2"}, check=True).stdout
        assert out.splitlines() == points[2].overrides


def test_manifest_round_trips(write_sweep):
    spec = load_spec(write_sweep(grid={"preset": ["tiny", "small"], "steps": [3]}))
    points = build_points(spec)
    path = write_manifest(spec, points)
    record, again = read_manifest(path.parent)
    assert record["name"] == "t" and again == points
    with pytest.raises(SweepError, match="no readable sweep.json"):
        read_manifest(path.parent / "elsewhere")


def test_final_eval_evaluates_each_point_once_at_its_last_step(write_sweep):
    spec = load_spec(write_sweep(final_eval=True, grid={"steps": [4, 9]}))
    assert [("eval.every=4" in p.overrides, "eval.every=9" in p.overrides) for p in build_points(spec)] == [
        (True, False), (False, True)]
    with pytest.raises(SweepError, match="final_eval: sets eval.every"):
        load_spec(write_sweep(final_eval=True, overrides={"eval.every": 5}))
    with pytest.raises(SweepError, match="final_eval: expected true or false"):
        load_spec(write_sweep(final_eval="yes please"))


def test_a_done_point_that_ran_with_another_config_is_flagged(write_sweep):
    spec = load_spec(write_sweep(grid={"steps": [4]}))
    (p,) = build_points(spec)
    folder = Path(spec.out_dir) / p.name
    _fake_run(folder, 4)
    assert changed_keys(spec, p, folder) == []  # no config in the checkpoint: nothing to compare
    ran = load_config(spec.config, p.overrides + ["train.stop_at=2", "train.resume=latest"]).to_dict()
    (folder / "checkpoints" / "step_00000004").mkdir()
    (folder / "checkpoints" / "step_00000004" / "config.yaml").write_text(yaml.safe_dump(ran))
    assert changed_keys(spec, p, folder) == []  # a time slice and resuming are not changes
    ran["optim"]["lr"] = 0.1234
    (folder / "checkpoints" / "step_00000004" / "config.yaml").write_text(yaml.safe_dump(ran))
    assert changed_keys(spec, p, folder) == ["optim.lr"]


def test_each_key_appears_once_on_a_command_line(write_sweep):
    spec = load_spec(write_sweep(overrides={"train.seed": 5, "model.preset": "small", "train.steps": 9,
                                            "model.depth": 3},
                                 presets={"deep": {"model.preset": "tiny", "model.depth": 6}},
                                 grid={"preset": ["tiny", "deep"], "seed": [1]}))
    tiny, deep = build_points(spec)
    for p in (tiny, deep):
        keys = [o.partition("=")[0] for o in p.overrides]
        assert len(keys) == len(set(keys)), p.overrides
        assert "train.seed=1" in p.overrides and "train.steps=9" in p.overrides
    assert "model.preset=tiny" in tiny.overrides and "model.depth=3" in tiny.overrides  # fixed size wins
    assert "model.depth=6" in deep.overrides  # a named variant's keys win over the fixed ones


def test_the_tiny_sweep_of_the_repository_plans():
    spec = load_spec(Path(__file__).resolve().parents[2] / "configs" / "sweeps" / "tiny.yaml")
    points = build_points(spec)
    names = ["tiny-f2.5e11-s0", "tiny-f1e12-s0", "small-f2.5e11-s0", "small-f1e12-s0"]
    assert [p.name for p in points] == names
    tiny, small = points[1], points[3]
    assert tiny.global_batch == small.global_batch == 8 and small.steps < tiny.steps
    assert f"eval.every={tiny.steps}" in tiny.overrides  # final_eval
