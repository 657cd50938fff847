"""Commands own their options: every default is written once (the pipelines' option
dataclasses, the training configs) and shown once in --help; an option of the other
pipeline is refused with one line; only user errors (InputError) become one-line
messages, and weights are verified before any work."""

from __future__ import annotations

import argparse
import inspect
import re
from dataclasses import fields

import numpy as np
import pytest

from psc.app import convert, evaluate, models_table, segment, train, view, worker
from psc.app.cli import filled, format_default, run_guarded, shown_default
from psc.app.segment import main as segment_main
from psc.pipelines.em.options import EMRunOptions
from psc.pipelines.mri.options import MRISegmentOptions
from psc.pipelines.options import option_default
from psc.utils.errors import InputError

COMMANDS = {"psc-segment": segment, "psc-eval": evaluate, "psc-train": train, "psc-convert": convert,
            "psc-worker": worker, "psc-view": view, "psc-models": models_table}


def parsers():
    """(name, parser) of every command and sub-command."""
    for name, module in COMMANDS.items():
        parser = module.build_parser()
        yield name, parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub, subparser in action.choices.items():
                    yield f"{name} {sub}", subparser


def helps(parser: argparse.ArgumentParser):
    """(action, its help as --help prints it) for every option with a help."""
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.help and action.help is not argparse.SUPPRESS:
            yield action, formatter._expand_help(action)


@pytest.mark.parametrize("name,parser", list(parsers()), ids=[name for name, _ in parsers()])
def test_every_help_names_its_default_at_most_once(name, parser):
    for action, text in helps(parser):
        assert len(re.findall("default", text, re.IGNORECASE)) <= 1, (name, action.option_strings, text)
    assert parser.format_help()  # every help string expands


def _check_defaults(parser: argparse.ArgumentParser, config: type) -> int:
    """Each option named after a field of ``config`` shows that field's default."""
    names = {item.name for item in fields(config)}
    checked = 0
    for action, text in helps(parser):
        field = action.dest
        if field not in names:
            continue
        try:
            expected = option_default(config, field)
        except KeyError:  # a field without a default: required, or the command's own (--out)
            continue
        shown = shown_default(action)
        if expected is None or isinstance(expected, bool) or expected == "":
            continue  # no value to show (a rule in words, a flag that is off, nothing)
        if field == "options":  # shown as the JSON the option takes
            import json

            assert json.loads(shown) == json.loads(json.dumps(expected)), (field, shown)
        else:
            value = tuple(shown) if isinstance(shown, list) else shown
            assert value == (tuple(expected) if isinstance(expected, list) else expected), (field, shown, expected)
        assert f"(default: {format_default(shown)})" in text, (field, text)
        checked += 1
    return checked


def test_psc_segment_help_defaults_are_the_option_dataclasses():
    parser = segment.build_parser()
    assert _check_defaults(parser, MRISegmentOptions) >= 3  # device, precision, overlap
    assert _check_defaults(parser, EMRunOptions) >= 3  # workers, thresholds, block size
    text = parser.format_help()
    assert "(default: 128 128 128)" in text and "(default: 0.25)" in text


def test_psc_train_help_defaults_are_the_training_configs():
    from psc.pipelines.em.train import EMTrainConfig
    from psc.pipelines.mri.train import TrainConfig

    sub = dict((name, parser) for name, parser in parsers())
    assert _check_defaults(sub["psc-train mri"], TrainConfig) >= 10
    assert _check_defaults(sub["psc-train em"], EMTrainConfig) >= 8


def test_unset_options_take_the_dataclass_defaults():
    args = segment.parse(["scan.nii.gz"])
    assert filled(args, MRISegmentOptions) == MRISegmentOptions()
    assert filled(args, EMRunOptions) == EMRunOptions()
    args = segment.parse(["raw.zarr", "--block-size", "16", "24", "20", "--workers", "0"])
    assert filled(args, EMRunOptions) == EMRunOptions(block_size=(16, 24, 20), workers=0)


@pytest.mark.parametrize("argv,named,belongs", [
    (["scan.nii.gz", "--workers", "8"], "--workers", "EM pipeline"),
    (["scan.nii.gz", "--workers", "1"], "--workers", "EM pipeline"),  # given, even at its default
    (["scan.nii.gz", "--block-size", "32", "32", "32", "--spool"], "--block-size, --spool", "EM pipeline"),
    (["raw.zarr", "--tta"], "--tta", "MRI pipeline"),
    (["raw.zarr/raw", "--window", "64", "-o", "x.zarr"], "--window", "MRI pipeline"),
    (["scan.nii.gz", "--pipeline", "em", "--probabilities"], "--probabilities", "MRI pipeline"),
])
def test_an_option_of_the_other_pipeline_is_refused(argv, named, belongs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    assert segment_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"psc-segment: error: {named} appl"), err
    assert belongs in err[0]
    assert sorted(tmp_path.rglob("*")) == before


def test_run_guarded_turns_only_user_errors_into_one_line(capsys):
    def user_error():
        raise InputError("bad input\nsecond line")

    def bug():
        raise ValueError("a bug inside torch")

    assert run_guarded("psc-x", user_error) == 2
    assert capsys.readouterr().err == "psc-x: error: bad input second line\n"
    with pytest.raises(ValueError, match="a bug inside torch"):
        run_guarded("psc-x", bug)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_entry_point_runs_guarded(name):
    assert "run_guarded(" in inspect.getsource(COMMANDS[name].main), name


def test_psc_train_keeps_tracebacks_of_bugs(tmp_path, monkeypatch):
    from psc.pipelines.mri import train as mri_train
    from test_mri_train import write_dataset

    write_dataset(tmp_path / "data")

    def broken(cfg, resume=False):
        raise ValueError("an error inside the training loop")

    monkeypatch.setattr(mri_train, "train", broken)
    with pytest.raises(ValueError, match="inside the training loop"):
        train.main(["mri", "--data", str(tmp_path / "data"), "--val", "case2", "--out", str(tmp_path / "run")])


@pytest.mark.parametrize("argv,message", [
    (["mri", "--data", "{tmp}/missing"], "no such folder"),
    (["mri", "--data", "{tmp}/data", "--val", "nobody"], "validation cases not found"),
    (["mri", "--data", "{tmp}/data", "--val", "case2", "--options", "{{no json"], "--options is not JSON"),
    (["mri", "--data", "{tmp}/data", "--val", "case2", "--conv", "p9sc9"], "--conv"),
    (["mri", "--data", "{tmp}/data", "--val", "case2", "--init", "{tmp}/none.pt"], "not found"),
    (["em", "--raw", "{tmp}/raw.zarr", "--labels", "{tmp}/labels.zarr"], "no such file"),
])
def test_psc_train_user_errors_are_one_line(argv, message, tmp_path, capsys):
    from test_mri_train import write_dataset

    write_dataset(tmp_path / "data")
    argv = [item.format(tmp=tmp_path) for item in argv] + ["--out", str(tmp_path / "run")]
    assert train.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("psc-train: error:") and message in err[0], err
    assert not (tmp_path / "run").exists()


# --- weights are verified before any work ----------------------------------------------

@pytest.fixture(scope="module")
def em_inputs(tmp_path_factory):
    from em_fixtures import synthetic_raw, tiny_weights

    folder = tmp_path_factory.mktemp("cli_em")
    raw, _, _ = synthetic_raw(folder, shape=(16, 24, 20))
    return raw, tiny_weights(folder)


@pytest.mark.parametrize("damage", ["truncated", "modified"])
def test_a_corrupt_em_weights_file_is_one_line_and_nothing_is_written(damage, em_inputs, tmp_path, capsys):
    raw, weights = em_inputs
    bad = tmp_path / "bad.pt"
    data = weights.read_bytes()
    bad.write_bytes(data[: len(data) // 2] if damage == "truncated" else data[:-1] + bytes([data[-1] ^ 1]))
    (tmp_path / "bad.json").write_text(weights.with_suffix(".json").read_text())
    out = tmp_path / "out.zarr"
    before = sorted(tmp_path.rglob("*"))
    code = segment_main([str(raw / "raw"), "-o", str(out), "--weights", str(bad), "--workers", "2",
                         "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("psc-segment: error:") and "sha256" in err[0], err
    assert sorted(tmp_path.rglob("*")) == before and not out.exists()


def test_a_model_of_the_other_kind_is_refused_naming_its_kind(em_inputs, tmp_path, capsys):
    from mri_fixtures import brain_phantom, save_nifti, save_tiny_model

    raw, em_weights = em_inputs
    mri_weights = save_tiny_model(tmp_path / "mri.pt")
    image, _ = brain_phantom((16, 16, 16))
    scan = save_nifti(tmp_path / "scan.nii.gz", image, np.eye(4))
    before = sorted(tmp_path.rglob("*"))
    assert segment_main([str(scan), "--weights", str(em_weights), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "em-affinity" in err[0] and "mri-tissue" in err[0], err
    assert segment_main([str(raw / "raw"), "--weights", str(mri_weights), "-o", str(tmp_path / "o.zarr")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mri-tissue" in err[0] and "em-affinity" in err[0], err
    assert sorted(tmp_path.rglob("*")) == before
