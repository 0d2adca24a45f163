"""A newcomer's first hour (issue 13): `llmtier run` behaves like HF generate, careless input gets a clear
message (never a traceback), nothing finished is lost, and a streamed model behaves like a transformers model.

The CLI runs in-process through ``llmtier.cli.main`` (fast); a few cases need a real process (broken pipe).
"""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from llmtier.bench.hfmodels import make_model  # noqa: E402
from llmtier.cli import main  # noqa: E402
from llmtier.errors import DiskFullError, LLMTierError  # noqa: E402
from llmtier.offload import stream_model  # noqa: E402
from llmtier.offload.generate import generate_timed  # noqa: E402
from llmtier.offload.weights import open_layout  # noqa: E402


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_model(str(tmp_path_factory.mktemp("nc") / "llama"), "llama", layers=3)


def run(capsys, *args):
    rc = main(["run", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def ref_generate(path, ids, new, **kw):
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    ids = torch.tensor([ids])
    torch.manual_seed(0)
    with torch.no_grad():
        return ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, **kw)[0, ids.shape[1]:].tolist()


# -- llmtier run = HF generate ---------------------------------------------------------------------------------------------
def test_run_stops_at_eos_and_uses_generation_config_like_hf_generate(llama, tmp_path, capsys):
    path = str(tmp_path / "m")
    shutil.copytree(llama, path)
    ids = [5, 6, 7, 8]
    m = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    free = generate_timed(m, torch.tensor([ids]), 8).tokens[0]  # 8 tokens, EOS ignored
    eos = free[2]
    gc = json.load(open(os.path.join(path, "generation_config.json")))
    gc.update(eos_token_id=eos, do_sample=False)
    json.dump(gc, open(os.path.join(path, "generation_config.json"), "w"))
    rc, out, _ = run(capsys, "--model", path, "--memory", "70%", "--prompt-ids", "5,6,7,8", "--max-new-tokens", "8",
                     "--json")
    got = json.loads(out)["tokens"][0]
    assert rc == 0 and got == ref_generate(path, ids, 8) == free[:free.index(eos) + 1]  # stopped at EOS, as HF does
    # sampling from generation_config.json, with a CLI override on top: equal to HF with the same seed
    gc.update(do_sample=True, temperature=0.7, top_k=20, eos_token_id=None)
    json.dump(gc, open(os.path.join(path, "generation_config.json"), "w"))
    rc, out, _ = run(capsys, "--model", path, "--memory", "70%", "--prompt-ids", "5,6,7,8", "--max-new-tokens", "6",
                     "--top-p", "0.9", "--repetition-penalty", "1.2", "--json")
    assert json.loads(out)["tokens"][0] == ref_generate(path, ids, 6, top_p=0.9, repetition_penalty=1.2)


def test_run_streams_text_default_memory_and_shares(llama, capsys):
    rc, out, err = run(capsys, "--model", llama, "--prompt", "The disk reads", "--max-new-tokens", "4")
    assert rc == 0 and out.strip() and "decode" in err and "50%ram" not in err  # default budget: a share of RAM
    rc, out, err = run(capsys, "--model", llama, "--memory", "70%", "--prompt", "The disk reads", "--max-new-tokens",
                       "2", "--dtype", "fp32", "--json")
    assert rc == 0 and json.loads(out)["streamed_layers"]


def test_chat_template_and_interactive_turns_reuse_the_prefix_store(llama, tmp_path, capsys, monkeypatch):
    path = str(tmp_path / "chat")
    shutil.copytree(llama, path)
    cfg = json.load(open(os.path.join(path, "tokenizer_config.json")))
    cfg["chat_template"] = "{% for m in messages %}<|endoftext|>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}" \
                           "{% if add_generation_prompt %}assistant:{% endif %}"
    json.dump(cfg, open(os.path.join(path, "tokenizer_config.json"), "w"))
    rc, out, _ = run(capsys, "--model", path, "--prompt", "hello", "--chat", "--max-new-tokens", "3", "--json")
    plain = json.loads(main_json(capsys, "--model", path, "--prompt", "hello", "--max-new-tokens", "3"))
    assert rc == 0 and json.loads(out)["prompt_tokens"] > plain["prompt_tokens"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("The disk reads large blocks quickly\nand then\n\n"))
    rc, out, err = run(capsys, "--model", path, "-i", "--chat", "--max-new-tokens", "4", "--kv-page-tokens", "4")
    turns = [line for line in err.splitlines() if "from the prefix cache" in line]
    assert rc == 0 and len(turns) == 2
    assert int(turns[1].split(",")[1].split()[0]) > 0  # the second turn loaded the first one's KV


def main_json(capsys, *args):
    rc, out, _ = run(capsys, *args, "--json")
    assert rc == 0
    return out


# -- nothing finished is lost ---------------------------------------------------------------------------------------------
def test_failing_prefix_save_and_trace_write_still_print_the_answer(llama, tmp_path, capsys, monkeypatch):
    from llmtier.offload.kv import PrefixStore

    def full(*a, **k):
        raise DiskFullError("no space left", path=str(tmp_path), errno=28)

    monkeypatch.setattr(PrefixStore, "save", full)
    trace = tmp_path / "no-such-dir" / "t.npz"
    rc, out, err = run(capsys, "--model", llama, "--prompt-ids", "5,6,7", "--max-new-tokens", "3",
                       "--prefix-cache", str(tmp_path / "p"), "--trace", str(trace), "--json")
    res = json.loads(out)
    assert rc == 0 and len(res["tokens"][0]) >= 1
    assert "prefix cache could not be saved" in err and "trace could not be written" in err
    assert len(res["warnings"]) == 2 and "trace" not in res


def test_budgets_that_cannot_hold_the_request_are_refused_at_start(llama, tmp_path, capsys):
    rc, _, err = run(capsys, "--model", llama, "--prompt-ids", ",".join(["5"] * 100), "--max-new-tokens", "200",
                     "--kv-offload", "--kv-memory", "8KiB", "--kv-dir", str(tmp_path))
    assert rc == 1 and "needs at least" in err and "--kv-memory" in err
    rc, _, err = run(capsys, "--model", llama, "--memory", "1PiB", "--prompt-ids", "5")
    assert rc == 1 and "more than this machine's RAM" in err


# -- careless input: a clear message each -------------------------------------------------------------------------
@pytest.mark.parametrize(("args", "says"), [
    (["--prompt", ""], "prompt is empty"),
    (["--prompt-ids", "1,2,99999"], "outside the model's vocabulary"),
    (["--prompt-ids", ",".join(["5"] * 5000)], "positions"),
    ([], "give --prompt"),
])
def test_careless_input_is_a_clear_error(llama, capsys, args, says):
    rc, _, err = run(capsys, "--model", llama, *args)
    assert rc == 1 and says in err and "Traceback" not in err


@pytest.mark.parametrize(("args", "says"), [
    (["--batch", "0"], "must be at least 1"),
    (["--memory", "lots"], "not a size"),
    (["--memory", "150%ram"], "at most 100%"),
])
def test_careless_options_are_usage_errors_with_the_reason(llama, capsys, args, says):
    with pytest.raises(SystemExit) as e:
        main(["run", "--model", llama, "--prompt-ids", "5", *args])
    assert e.value.code == 2 and says in capsys.readouterr().err


def test_wrong_model_paths_say_what_to_give(llama, tmp_path, capsys):
    rc, _, err = run(capsys, "--model", os.path.join(llama, "config.json"), "--prompt-ids", "5")
    assert rc == 1 and "give the model's directory" in err
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(os.path.join(llama, "config.json"), pickled)
    torch.save({"w": torch.zeros(2)}, pickled / "pytorch_model.bin")
    rc, _, err = run(capsys, "--model", str(pickled), "--prompt-ids", "5")
    assert rc == 1 and "save it as safetensors" in err
    t5 = tmp_path / "t5"
    cfg = transformers.T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8, vocab_size=64)
    transformers.T5ForConditionalGeneration(cfg).save_pretrained(t5)
    rc, _, err = run(capsys, "--model", str(t5), "--prompt-ids", "5")
    assert rc == 1 and "not a decoder-only causal LM" in err and len(err) < 400


def test_opt_prompt_beyond_its_positions_is_refused(tmp_path, capsys):
    opt = make_model(str(tmp_path / "opt"), "opt", layers=2, tokenizer=False)  # 512 learned positions
    rc, _, err = run(capsys, "--model", opt, "--prompt-ids", ",".join(["5"] * 510), "--max-new-tokens", "8")
    assert rc == 1 and "512 positions" in err and "--max-new-tokens to 2" in err


def test_missing_hf_extra_names_the_install(llama, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    rc, _, err = run(capsys, "--model", llama, "--prompt-ids", "5")
    assert rc == 1 and "pip install 'llmtier[hf]'" in err


def test_inspect_into_a_closed_pipe_is_quiet(llama):
    """`llmtier inspect --json | head`: the reader is gone before llmtier writes; no traceback, no error."""
    r, w = os.pipe()
    os.close(r)  # the reader left already: every write gets EPIPE
    p = subprocess.run([sys.executable, "-m", "llmtier.cli", "inspect", "--json", "--tensors",
                        os.path.join(llama, "model.safetensors")], stdout=w, stderr=subprocess.PIPE, text=True,
                       timeout=120, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    os.close(w)
    assert p.returncode == 0 and "Broken pipe" not in p.stderr and "Traceback" not in p.stderr, p.stderr


# -- a streamed model behaves like a transformers model -----------------------------------------------------------------
def test_streamed_model_device_to_casts_and_pipeline(llama):
    tok = transformers.AutoTokenizer.from_pretrained(llama)
    ref = transformers.AutoModelForCausalLM.from_pretrained(llama, dtype=torch.bfloat16).eval()
    enc = tok("The disk reads", return_tensors="pt")
    with torch.no_grad():
        want = ref.generate(**enc, max_new_tokens=5, do_sample=False)
    with stream_model(llama, "70%") as m:
        assert m.llmtier.plan.streamed and m.device == torch.device("cpu")
        assert torch.equal(m.generate(**tok("The disk reads", return_tensors="pt").to(m.device), max_new_tokens=5,
                                      do_sample=False), want)
        assert m.to("cpu") is m and m.to(torch.bfloat16) is m and m.cpu() is m
        for bad in (lambda: m.to("meta"), m.half, m.float, lambda: m.save_pretrained("x")):
            with pytest.raises(LLMTierError, match=r"stream_model|convert"):
                bad()
        pipe = transformers.pipeline("text-generation", model=m, tokenizer=tok)
        text = pipe("The disk reads", max_new_tokens=5, do_sample=False)[0]["generated_text"]
        assert text == tok.decode(want[0], skip_special_tokens=True)


def test_stream_model_casts_on_load_and_takes_dtype_names(tmp_path):
    fp32 = make_model(str(tmp_path / "fp32"), "llama", layers=4, dtype="float32", tokenizer=False)
    ids = torch.tensor([[5, 6, 7, 8]])
    ref = transformers.AutoModelForCausalLM.from_pretrained(fp32, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        want = ref(ids).logits
    lay = open_layout(fp32)
    least = lay.least_memory
    lay.source.close()
    for name in ("bf16", "bfloat16", "torch.bfloat16", torch.bfloat16):
        with stream_model(fp32, least, dtype=name) as m, torch.no_grad():
            assert m.dtype == torch.bfloat16 and m.llmtier.plan.streamed
            assert torch.equal(m(ids).logits, want)
    with pytest.raises(ValueError, match="unknown dtype"):
        stream_model(fp32, least, dtype="bf17")


# -- one style for the API -------------------------------------------------------------------------------------------------
def test_one_api_style_stats_verify_mapping_and_device(llama, tmp_path):
    import warnings

    from llmtier.offload.kv import PrefixStore, TieredCache
    from llmtier.store import StoreWriter, TensorNotFoundError, open_store

    with stream_model(llama, "70%", verify=True) as m, torch.no_grad():  # True means "always", as for open_store
        m(torch.tensor([[5, 6]]))
        s = m.llmtier.stats()
        assert s.bytes_read > 0 and s.as_dict()["bytes_read"] == s.bytes_read
        with pytest.warns(DeprecationWarning):
            assert s["bytes_read"] == s.bytes_read
        with TieredCache(m.config, memory="8MiB", path=tmp_path) as c, PrefixStore(tmp_path / "p") as p:
            for st in (c.stats(), p.metrics()):  # the same shape: attributes and as_dict()
                assert isinstance(st.as_dict(), dict) and all(getattr(st, k) == v for k, v in st.as_dict().items())
    path = str(tmp_path / "s.lts")
    with StoreWriter(path) as w:
        w.add("a", torch.arange(6, dtype=torch.float32).reshape(2, 3))
    for verify in (True, False, "first", "always", "never"):
        with open_store(path, verify=verify) as st, warnings.catch_warnings():
            warnings.simplefilter("error")
            assert st["a"].tolist() == [[0, 1, 2], [3, 4, 5]] and dict(st.items()).keys() == {"a"}
            assert st.get_torch("a", device="cpu").dtype == torch.float32
            with pytest.raises(KeyError):
                st["b"]
            with pytest.raises(TensorNotFoundError):
                st["b"]
    with pytest.raises(ValueError, match="verify must be"):
        open_store(path, verify="sometimes")


def test_run_stops_at_a_stop_string_like_hf_generate(llama, capsys):
    tok = transformers.AutoTokenizer.from_pretrained(llama)
    args = ("--model", llama, "--memory", "70%", "--prompt", "The disk reads", "--max-new-tokens", "10", "--greedy")
    rc, out, _ = run(capsys, *args, "--json")
    free = json.loads(out)["tokens"][0]
    assert rc == 0 and len(free) == 10
    stop = tok.decode(free[:3])[-2:]  # ends the third token's text
    assert stop.strip(), "the tiny tokenizer gave an empty stop string"
    rc, out, _ = run(capsys, *args, "--stop", stop, "--json")
    got = json.loads(out)["tokens"][0]
    ids = tok("The disk reads").input_ids
    want = ref_generate(llama, ids, 10, do_sample=False, stop_strings=[stop], tokenizer=tok)
    assert rc == 0 and got == want and len(got) < len(free) and tok.decode(got).endswith(stop)
