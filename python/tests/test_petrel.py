"""The Python bindings, as a user calls them: Petrel-tiny (committed) and SmolLM2-135M
(pulled by CI into $PETREL_HOME)."""

import os
import pathlib
import threading
import time

import pytest

import petrel

ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY = str(ROOT / "models" / "petrel-tiny" / "petrel-tiny-w4a4.gguf")
HOME = pathlib.Path(os.environ.get("PETREL_HOME", pathlib.Path.home() / ".cache" / "petrel"))
SMOLLM2 = HOME / "SmolLM2-135M-Instruct.Q4_1.gguf"
FRANCE = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
]


@pytest.fixture(scope="module")
def tiny():
    return petrel.Model(TINY, threads=1, context=256, kv_type="f32")


@pytest.fixture(scope="module")
def smollm2():
    assert SMOLLM2.exists(), f"{SMOLLM2} is missing: run `petrel pull smollm2-135m` first"
    return petrel.Model(str(SMOLLM2), threads=2, context=512)


def test_generate_returns_text_and_the_stream_gives_the_same_pieces(tiny):
    text = tiny.generate("Once upon a time", max_tokens=20)
    assert isinstance(text, str) and text
    pieces = list(tiny.generate("Once upon a time", max_tokens=20, stream=True))
    assert all(isinstance(p, str) for p in pieces)
    assert "".join(pieces) == text
    # Each call starts from an empty context: the same call, the same reply.
    assert tiny.generate("Once upon a time", max_tokens=20) == text


def test_a_stream_dropped_early_stops_and_leaves_the_model_usable(tiny):
    full = tiny.generate("The little dog", max_tokens=30)
    stream = tiny.generate("The little dog", max_tokens=30, stream=True)
    first = next(stream)
    assert full.startswith(first)
    del stream
    assert tiny.generate("The little dog", max_tokens=30) == full


def test_stop_sequences_and_sampling(tiny):
    full = tiny.generate("Once upon a time", max_tokens=20)
    word = full.split()[1]
    cut = tiny.generate("Once upon a time", max_tokens=20, stop=[word])
    assert word not in cut and full.startswith(cut)
    a = tiny.generate("Once upon a time", max_tokens=20, temperature=0.8, seed=7)
    b = tiny.generate("Once upon a time", max_tokens=20, temperature=0.8, seed=7)
    assert a == b


def test_tokenize_and_detokenize(tiny):
    ids = tiny.tokenize("hello world", add_bos=False)
    assert isinstance(ids, list) and all(isinstance(i, int) for i in ids)
    assert tiny.detokenize(ids) == "hello world"
    assert tiny.vocab_size > max(ids) and tiny.context_length > 0


def test_bad_input_raises_python_exceptions_with_the_runtimes_message(tiny):
    with pytest.raises(TypeError):
        tiny.generate(42)
    with pytest.raises(TypeError):
        tiny.chat("not a list")
    with pytest.raises(TypeError, match=r"messages\[0\]\['content'\] must be a str"):
        tiny.chat([{"role": "user", "content": 5}])
    with pytest.raises(ValueError, match="has no 'content'"):
        tiny.chat([{"role": "user"}])
    with pytest.raises(ValueError, match="top_p"):
        tiny.generate("x", top_p=3.0)
    with pytest.raises(ValueError, match="temperature"):
        tiny.generate("x", temperature=-1.0)
    with pytest.raises(OverflowError):
        tiny.generate("x", max_tokens=-1)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tiny.detokenize([2**31])
    with pytest.raises(ValueError, match="context holds 256"):
        tiny.generate("word " * 400)
    with pytest.raises(ValueError, match="kv_type"):
        petrel.Model(TINY, kv_type="q3")
    with pytest.raises(FileNotFoundError, match="neither an existing file nor a known model"):
        petrel.Model("/nonexistent/model.gguf")
    truncated = pathlib.Path(os.environ.get("TMPDIR", "/tmp")) / f"petrel-truncated-{os.getpid()}.gguf"
    truncated.write_bytes(pathlib.Path(TINY).read_bytes()[:1000])
    try:
        with pytest.raises(petrel.PetrelError, match="cannot load the model"):
            petrel.Model(str(truncated))
    finally:
        truncated.unlink()
    # After all of that the model still answers.
    assert tiny.generate("Once upon a time", max_tokens=4)


def test_smollm2_answers_paris(smollm2):
    assert "Paris" in smollm2.chat(FRANCE, max_tokens=32)
    assert "Paris" in "".join(smollm2.chat(FRANCE, max_tokens=32, stream=True))


def test_a_saved_conversation_continues_as_if_it_never_stopped(smollm2, tmp_path):
    first = smollm2.chat(FRANCE, max_tokens=32)
    smollm2.save_state(tmp_path / "france.petrel")
    follow_up = FRANCE + [{"role": "assistant", "content": first}, {"role": "user", "content": "And of Italy?"}]
    went_on = smollm2.chat(follow_up, max_tokens=32)
    smollm2.reset()
    smollm2.load_state(tmp_path / "france.petrel")
    assert smollm2.chat(follow_up, max_tokens=32) == went_on
    with pytest.raises(petrel.PetrelError, match="another model"):
        petrel.Model(TINY, threads=1, context=256).load_state(tmp_path / "france.petrel")


def test_the_gil_is_released_while_computing(smollm2):
    done = threading.Event()
    result = {}

    def work():
        result["text"] = smollm2.generate("Once upon a time", max_tokens=96)
        done.set()

    worker = threading.Thread(target=work)
    started = time.perf_counter()
    worker.start()
    spins = 0
    while not done.is_set():
        spins += 1
    worker.join()
    elapsed = time.perf_counter() - started
    # With the GIL held through the whole reply this loop would barely run (it would get
    # the interpreter only at the reply's end); released, it spins the whole time.
    assert result["text"]
    assert spins > 10_000, f"{spins} spins in {elapsed:.2f} s"
