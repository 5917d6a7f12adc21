"""The engine's per-request sampling options against oracles: n samples against separate
seeded requests (and the pages they share), beam search against a brute-force beam search
over full forward passes, penalties and log-probabilities against numpy on the model's own
logits, stop strings against the same request run without them."""

from __future__ import annotations

import numpy as np
import pytest

from jaxllm.engine import EngineConfig, LLMEngine
from jaxllm.errors import JaxLLMError
from jaxllm.generate import Generator
from jaxllm.model import Transformer, random_params
from jaxllm.sampling import SamplingParams

PROMPT = [int(t) for t in np.random.default_rng(11).integers(3, 250, 37)]  # 4 pages + 5 slots


@pytest.fixture(scope="module")
def tiny(tiny_config):
    return tiny_config, random_params(tiny_config, seed=5, scale=0.3)


@pytest.fixture(scope="module")
def oracle(tiny):
    """Full-sequence logits [T, V] from the static path (no paged cache)."""
    cfg, params = tiny
    gen = Generator(Transformer(cfg, params))
    return lambda ids: np.asarray(gen.logits(list(ids)), np.float64)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def make_engine(tiny, **kw) -> LLMEngine:
    cfg, params = tiny
    kw.setdefault("num_pages", 64)
    kw.setdefault("page_size", 8)
    return LLMEngine(Transformer(cfg, params), EngineConfig(**kw), detokenize=letters)


def letters(ids) -> str:
    return "".join(chr(97 + t % 26) for t in ids)


def test_n_samples_share_prompt_pages_and_equal_seeded_requests(tiny):
    p = SamplingParams(temperature=1.0, max_tokens=6, seed=7, n=4, ignore_eos=True)
    engine = make_engine(tiny)
    rid = engine.add_request(PROMPT, p)
    engine.step()  # the prompt, once; four first tokens from its logits
    assert engine.metrics()["kv_pages_used"] == 5  # shared by the four sequences
    assert [engine.blocks.ref[q] for q in engine.blocks.table(rid)] == [4] * 5
    engine.step()  # each writes its own token: three copy-on-write copies of the last page
    assert engine.metrics()["kv_pages_used"] == 5 + 3
    assert engine.blocks.ref[engine.blocks.table(rid)[0]] == 4
    while engine.has_unfinished():
        engine.step()
    got = engine.collect(rid)
    engine.blocks.check()
    assert engine.metrics()["kv_pages_free"] == engine.metrics()["kv_pages_total"]

    separate = make_engine(tiny).run(
        [PROMPT] * 4, [SamplingParams(**{**_kw(p), "n": 1, "seed": 7 + i}) for i in range(4)]
    )
    assert [c.token_ids for c in got.completions] == [r.output for r in separate]
    assert len({tuple(c.token_ids) for c in got.completions}) > 1  # they really differ


def _kw(p: SamplingParams) -> dict:
    return {k: getattr(p, k) for k in ("temperature", "max_tokens", "seed", "ignore_eos")}


def test_best_of_keeps_the_most_likely_samples(tiny):
    p = SamplingParams(temperature=1.0, max_tokens=5, seed=3, n=2, best_of=4, ignore_eos=True)
    got = make_engine(tiny).run([PROMPT], [p])[0]
    singles = make_engine(tiny).run(
        [PROMPT] * 4,
        [SamplingParams(**{**_kw(p), "seed": 3 + i, "logprobs": 0}) for i in range(4)],
    )
    ranked = sorted(singles, key=lambda r: -r.completions[0].cumulative_logprob)[:2]
    assert [c.token_ids for c in got.completions] == [r.output for r in ranked]
    np.testing.assert_allclose(
        [c.cumulative_logprob for c in got.completions],
        [r.completions[0].cumulative_logprob for r in ranked],
        rtol=1e-5,
    )


def brute_force_beams(score_fn, prompt, width, max_tokens, stop_ids, length_penalty=1.0):
    """Beam search by the same rule as the engine (HF's early_stopping=True), one full forward
    pass per beam per step."""
    beams = [([], 0.0)]
    finished = []
    while True:
        cands = []
        for order, (toks, total) in enumerate(beams):
            logp = log_softmax(score_fn(prompt + toks)[-1])
            top = np.argsort(-logp, kind="stable")[: 2 * width]
            for rank, t in enumerate(top):
                cands.append((-(total + logp[t]), order, rank, toks, int(t), total + logp[t]))
        cands.sort(key=lambda c: c[:3])
        nxt = []
        for pos, (_, _, _, toks, t, total) in enumerate(cands):
            if t in stop_ids:
                if pos < width:
                    finished.append((total / (len(toks) + 1) ** length_penalty, toks + [t]))
            else:
                nxt.append((toks + [t], total))
            if len(nxt) == width:
                break
        beams = nxt
        if len(finished) >= width or not beams or len(beams[0][0]) >= max_tokens:
            if beams and len(beams[0][0]) >= max_tokens:
                finished += [(tot / len(toks) ** length_penalty, toks) for toks, tot in beams]
            return sorted(finished, key=lambda h: -h[0])


@pytest.mark.parametrize("with_stop", [False, True], ids=["length", "stop-token"])
def test_beam_search_matches_brute_force(tiny, oracle, with_stop):
    width, max_tokens = 4, 6
    stops: list[int] = []
    if with_stop:  # the most likely first token: one hypothesis ends at once
        stops = [int(np.argmax(oracle(PROMPT)[-1]))]
    want = brute_force_beams(oracle, PROMPT, width, max_tokens, stops)[:width]
    p = SamplingParams(
        temperature=0.0, n=width, use_beam_search=True, max_tokens=max_tokens,
        stop_token_ids=stops, ignore_eos=True,
    )  # fmt: skip
    engine = make_engine(tiny, num_pages=40)
    got = engine.run([PROMPT], [p])[0]
    assert [c.token_ids for c in got.completions] == [toks for _, toks in want]
    scores = [c.cumulative_logprob / len(c.token_ids) for c in got.completions]
    np.testing.assert_allclose(scores, [s for s, _ in want], rtol=1e-4)
    if with_stop:
        assert any(c.finish_reason == "stop" for c in got.completions)
    engine.blocks.check()
    assert engine.metrics()["kv_pages_free"] == engine.metrics()["kv_pages_total"]


def test_penalties_match_numpy(tiny, oracle):
    p = SamplingParams(
        temperature=0.0, max_tokens=10, repetition_penalty=1.8, presence_penalty=0.7,
        frequency_penalty=0.4, ignore_eos=True,
    )  # fmt: skip
    prompt = PROMPT[:12] * 2
    want: list[int] = []
    for _ in range(p.max_tokens):
        logits = oracle(prompt + want)[-1].copy()
        seen = np.zeros(len(logits), bool)
        seen[prompt + want] = True
        logits[seen] = np.where(logits[seen] > 0, logits[seen] / 1.8, logits[seen] * 1.8)
        counts = np.bincount(want, minlength=len(logits))
        logits -= 0.4 * counts + 0.7 * (counts > 0)
        want.append(int(np.argmax(logits)))
    plain = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    # Beside a request without penalties in the same batch, which must stay unpenalised.
    got, other = make_engine(tiny).run([prompt, prompt], [p, plain])
    assert got.output == want
    greedy: list[int] = []
    for _ in range(10):
        greedy.append(int(np.argmax(oracle(prompt + greedy)[-1])))
    assert other.output == greedy and greedy != want


def test_logprobs_and_prompt_logprobs_match_full_forward(tiny, oracle):
    p = SamplingParams(temperature=0.0, max_tokens=5, logprobs=3, prompt_logprobs=2)
    # Chunked prefill: the prompt is scored across three steps.
    got = make_engine(tiny, max_num_batched_tokens=16).run([PROMPT], [p])[0]
    seq = PROMPT + got.output
    logp = log_softmax(oracle(seq))
    comp = got.completions[0]
    for i, (tok, entry) in enumerate(zip(got.output, comp.logprobs)):
        row = logp[len(PROMPT) - 1 + i]
        top = np.argsort(-row)[:3]
        assert set(entry) == {tok, *map(int, top)}
        for t, lp in entry.items():
            assert lp == pytest.approx(row[t], abs=1e-4)
    assert comp.cumulative_logprob == pytest.approx(
        sum(logp[len(PROMPT) - 1 + i, t] for i, t in enumerate(got.output)), abs=1e-3
    )
    assert got.prompt_logprobs[0] is None and len(got.prompt_logprobs) == len(PROMPT)
    for pos in range(1, len(PROMPT)):
        row = logp[pos - 1]
        entry = got.prompt_logprobs[pos]
        assert set(entry) == {PROMPT[pos], *map(int, np.argsort(-row)[:2])}
        for t, lp in entry.items():
            assert lp == pytest.approx(row[t], abs=1e-4)


def test_stop_strings_cut_the_text(tiny):
    base = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    free = make_engine(tiny).run([PROMPT], [base])[0].output
    text = letters(free)
    stop = text[4:6]  # completed by the sixth token at the latest
    at = text.find(stop)
    engine = make_engine(tiny)
    for include in (False, True):
        p = SamplingParams(
            temperature=0.0, max_tokens=12, ignore_eos=True, stop=[stop, "#never"],
            include_stop_str_in_output=include,
        )  # fmt: skip
        c = engine.run([PROMPT], [p])[0].completions[0]
        assert c.finish_reason == "stop" and c.stop_reason == stop
        assert c.token_ids == free[: at + len(stop)]
        assert c.text == (text[: at + len(stop)] if include else text[:at])


def test_bad_sampling_values_name_the_limit(tiny):
    with pytest.raises(JaxLLMError, match=r"repetition_penalty=0.0 must be in \(0, 10\]"):
        SamplingParams(repetition_penalty=0.0)
    with pytest.raises(JaxLLMError, match=r"best_of=2 must be in \[n=3, 64\]"):
        SamplingParams(n=3, best_of=2)
    with pytest.raises(JaxLLMError, match=r"logprobs=21 must be in \[0, 20\]"):
        SamplingParams(logprobs=21)
    with pytest.raises(JaxLLMError, match="use_beam_search needs temperature=0"):
        SamplingParams(use_beam_search=True, n=2)
    cfg, params = tiny
    no_tok = LLMEngine(Transformer(cfg, params), EngineConfig(num_pages=16, page_size=8))
    with pytest.raises(JaxLLMError, match="stop strings .* need a tokenizer"):
        no_tok.add_request([1, 2], SamplingParams(stop=["x"]))
    with pytest.raises(JaxLLMError, match="exceed max_num_seqs=4"):
        make_engine(tiny, max_num_seqs=4).add_request([1, 2], SamplingParams(n=5))
    with pytest.raises(JaxLLMError, match="need the serving engine"):
        Generator(Transformer(cfg, params)).generate([[1, 2]], [SamplingParams(n=2)])


def test_forks_beams_aborts_and_preemption_keep_the_pool_whole(tiny):
    """A mixed load (n samples, beams, penalties, a stop string) in a pool small enough to
    preempt, with aborts mid-flight: after every step the block manager's refcounts match its
    tables, and at the end every page is free and every request has its completions."""
    rng = np.random.default_rng(4)
    engine = make_engine(tiny, num_pages=24, max_num_batched_tokens=32, max_num_seqs=12)
    kinds = [
        SamplingParams(temperature=0.9, n=3, max_tokens=9, seed=1, ignore_eos=True),
        SamplingParams(temperature=0.0, n=2, use_beam_search=True, max_tokens=7, ignore_eos=True),
        SamplingParams(temperature=0.7, n=2, best_of=3, max_tokens=6, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=11, repetition_penalty=1.3, stop=["zz"]),
    ]
    rids = []
    for i in range(10):
        prompt = [int(t) for t in rng.integers(3, 250, int(rng.integers(3, 40)))]
        rids.append(engine.add_request(prompt, kinds[i % len(kinds)]))
    aborted = {rids[2], rids[7]}
    steps = 0
    while engine.has_unfinished():
        engine.step()
        engine.blocks.check()
        steps += 1
        if steps == 3:
            for r in aborted:
                engine.abort(r)
    assert engine.metrics()["preemptions"] > 0
    assert engine.metrics()["kv_pages_free"] == engine.metrics()["kv_pages_total"]
    for i, r in enumerate(rids):
        assert engine.is_finished(r)
        out = engine.collect(r)
        if r not in aborted:
            p = kinds[i % len(kinds)]
            assert len(out.completions) == p.n
            assert all(1 <= len(c.token_ids) <= p.max_tokens for c in out.completions)
