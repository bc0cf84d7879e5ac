"""`python -m trainer.generate`'s command line, in-process without a model: the device it is asked for and how the
outputs of several prompts are told apart. (Generation from a trained model: tests/test_export.py.)"""
import os
import tempfile

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"triton-cache-{os.getuid()}"))

import pytest  # noqa: E402
import torch  # noqa: E402

from models import cpu_triton  # noqa: E402

cpu_triton.enable()

from trainer import generate  # noqa: E402


def one_error_line(capsys, argv) -> str:
    assert generate.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0][len("error: "):]


def test_a_device_the_machine_lacks_is_one_error_line_naming_the_fix(tmp_path, monkeypatch, capsys):
    """--device cuda without CUDA ended in torch's 33-line traceback (AssertionError: Torch not compiled with CUDA
    enabled), raised as the model moved to the device."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(generate, "load", lambda *a: pytest.fail("loaded a model for a device that is not there"))
    run = str(tmp_path)
    assert one_error_line(capsys, [run, "--device", "cuda"]) == (
        "--device cuda: no CUDA device here (torch.cuda.is_available() is False); use --device cpu")
    assert one_error_line(capsys, [run, "--device", "cuda:1"]).startswith("--device cuda:1: no CUDA device here")
    assert one_error_line(capsys, [run, "--device", "gpu"]) == (
        "--device gpu: not a device name; use cuda, cuda:N or cpu")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert one_error_line(capsys, [run, "--device", "mps"]) == "--device mps: no mps device here; use --device cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert one_error_line(capsys, [run, "--device", "cuda:2"]) == (
        "--device cuda:2: this machine has 2 CUDA devices (cuda:0 to cuda:1); use one of those or --device cpu")
    assert generate.pick_device("cuda:1") == torch.device("cuda", 1)
    assert generate.pick_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert generate.pick_device(None) == torch.device("cpu")


def test_several_prompts_each_get_a_header_and_one_prompt_prints_just_its_text(tmp_path, monkeypatch, capsys):
    """Several prompts' outputs ran together (a tiny model's greedy text is mostly newlines): each now follows a
    header naming its prompt. One prompt prints the prompt and its continuation alone, as before."""
    monkeypatch.setattr(generate, "load", lambda path, device: ("model", "tok", 0, None))
    texts = {"to be": "\n\n", "or not": " to be\n", " x\ny": ""}
    monkeypatch.setattr(generate, "generate", lambda model, tok, eos, bos, prompt, *a: texts[prompt])
    assert generate.main([str(tmp_path), "to be", "or not", " x\ny", "--device", "cpu"]) == 0
    assert capsys.readouterr().out == ('--- prompt 1/3: "to be"\nto be\n\n\n'
                                       '--- prompt 2/3: "or not"\nor not to be\n\n'
                                       '--- prompt 3/3: " x\\ny"\n x\ny\n')
    assert generate.main([str(tmp_path), "or not", "--device", "cpu"]) == 0
    assert capsys.readouterr().out == "or not to be\n\n"
