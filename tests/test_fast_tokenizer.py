import json
import math
import time

import numpy as np
import pytest

from model import FastTokenizer, dct_matrix

T, D = 8, 7  # embedded default FAST chunk


def smooth_chunks(n, horizon=T, seed=0):
    """Synthetic normalized action chunks: 6 dims = sums of two low-frequency sinusoids scaled into [-1, 1],
    gripper dim in {-1, 1} that flips inside 20% of the chunks."""
    rng = np.random.default_rng(seed)
    t = np.arange(horizon)[None, None, :, None] / horizon
    shape = (n, 2, 1, D - 1)
    x = (rng.uniform(0.2, 1, shape) * np.sin(2 * np.pi * rng.uniform(0, 0.8, shape) * t + rng.uniform(0, 2 * np.pi, shape))).sum(1)
    x = x / np.abs(x).max(axis=(0, 1))
    grip = np.where(rng.random(n) < 0.5, -1.0, 1.0)[:, None].repeat(horizon, 1)
    flips, at = rng.random(n) < 0.2, rng.integers(1, horizon, n)
    grip[flips] = np.where(np.arange(horizon)[None] >= at[flips, None], -grip[flips], grip[flips])
    return np.concatenate([x, grip[..., None]], axis=-1)


def explicit_dct(x):
    """Orthonormal DCT-II along axis 0 by its formula: sqrt(2/T) c_k sum_n x_n cos(pi (2n+1) k / 2T), c_0 = 1/sqrt2."""
    n_t = x.shape[0]
    out = np.zeros_like(x, dtype=np.float64)
    for k in range(n_t):
        c_k = 1 / math.sqrt(2) if k == 0 else 1.0
        for n in range(n_t):
            out[k] += math.sqrt(2 / n_t) * c_k * x[n] * math.cos(math.pi * (2 * n + 1) * k / (2 * n_t))
    return out


def integer_chunks(rows):
    """Chunks [N, 1, len] whose FAST base sequence is exactly `rows`: with T=1 the ortho DCT is the identity,
    so value v/10 becomes round(10 * v/10) = v."""
    return np.asarray(rows, dtype=np.float64)[:, None, :] / 10.0


@pytest.fixture(scope="module")
def fitted():
    train = smooth_chunks(10_000, seed=0)
    t0 = time.perf_counter()
    tok = FastTokenizer.fit(train, vocab_size=256, scale=10.0)
    fit_seconds = time.perf_counter() - t0
    return tok, fit_seconds


def test_fit_speed_and_attributes(fitted):
    tok, fit_seconds = fitted
    # Soft bound (shared 2-core machine; measured ~0.4 s alone): catches a per-merge full Python recount.
    assert fit_seconds < 30, f"fit on 10k [8,7] chunks took {fit_seconds:.1f} s"
    assert (tok.horizon, tok.action_dim, tok.scale, tok.vocab_size) == (8, 7, 10.0, 256)
    assert tok.alphabet_size + len(tok.merges) == 256  # smooth data has plenty of repeated pairs


def test_dct_matches_explicit_formula():
    rng = np.random.default_rng(0)
    for horizon in (1, 2, 5, 8, 16):
        x = rng.uniform(-1, 1, (horizon, D))
        M = dct_matrix(horizon)
        np.testing.assert_allclose(M @ x, explicit_dct(x), atol=1e-6)
        np.testing.assert_allclose(M.T @ (M @ x), x, atol=1e-12)  # DCT-III (= M.T) inverts it
    # through the tokenizer: with no merges (vocab = alphabet) the ids are round(10 * DCT) flattened - min_token
    chunks = rng.uniform(-1, 1, (20, T, D))
    expected = np.stack([np.rint(10 * explicit_dct(c)).reshape(-1) for c in chunks])
    alphabet = int(expected.max() - expected.min() + 1)
    tok = FastTokenizer.fit(chunks, vocab_size=alphabet)
    assert tok.merges == [] and tok.min_token == expected.min()
    assert [tok.encode(c) for c in chunks] == (expected - expected.min()).astype(int).tolist()


def test_flatten_is_frequency_major():
    # T=2: c0 = (x0 + x1)/sqrt2, c1 = (x0 - x1)/sqrt2. Pick coefficients dim0 (0.5, 0.1), dim1 (-0.3, 0.2).
    s = math.sqrt(2)
    chunk = np.array([[(0.5 + 0.1) / s, (-0.3 + 0.2) / s],
                      [(0.5 - 0.1) / s, (-0.3 - 0.2) / s]])
    tok = FastTokenizer.fit(chunk[None], vocab_size=9)  # coefficients 5, -3, 1, 2 -> alphabet [-3, 5] = 9 ids
    assert tok.min_token == -3 and tok.alphabet_size == 9 and tok.merges == []
    # [c0_d0, c0_d1, c1_d0, c1_d1] - min_token = [5, -3, 1, 2] + 3
    assert tok.encode(chunk) == [8, 0, 4, 5]


def test_round_trip_error_and_compression(fitted):
    tok, _ = fitted
    held_out = smooth_chunks(500, seed=1)
    ids = tok.encode_batch(held_out)
    decoded = np.stack([tok.decode(i) for i in ids])
    assert decoded.dtype == np.float32 and decoded.shape == held_out.shape
    err = np.abs(decoded - held_out).mean()
    assert err < 0.02, f"mean abs round-trip error {err:.4f}"  # measured 0.0175 (scale 10 rounding)
    tokens_per_chunk = np.mean([len(i) for i in ids])
    assert tokens_per_chunk <= T * D / 2, tokens_per_chunk  # measured 18.8 of 56
    assert ids == [tok.encode(c) for c in held_out]  # batch and single paths agree


def test_encode_matches_naive_reference(fitted):
    """Independent encode: explicit DCT, round, frequency-major flatten, shift, then apply every merge in
    learned order to the whole sequence (what lowest-rank-first BPE amounts to: a merge's new id only takes
    part in later merges). Applying the highest rank first would give different ids on this data."""
    tok, _ = fitted
    for chunk in smooth_chunks(100, seed=4):
        seq = (np.rint(10 * explicit_dct(chunk)).reshape(-1).astype(int) - tok.min_token).tolist()
        for r, (a, b) in enumerate(tok.merges):
            out, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and (seq[i], seq[i + 1]) == (a, b):
                    out.append(tok.alphabet_size + r)
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            seq = out
        assert tok.encode(chunk) == seq


def test_encode_of_decode_is_identity_for_valid_sequences(fitted):
    tok, _ = fitted
    for chunk in smooth_chunks(200, seed=2):
        ids = tok.encode(chunk)
        assert all(0 <= i < tok.vocab_size for i in ids)
        decoded, valid = tok.decode(ids, return_valid=True)
        assert valid
        assert tok.encode(decoded) == ids
        assert tok.decode(np.array(ids)).tolist() == decoded.tolist()  # numpy input accepted


def test_save_load_round_trip(fitted, tmp_path):
    tok, _ = fitted
    path = tmp_path / "fast_tokenizer.json"
    tok.save(path)
    loaded = FastTokenizer.load(path)
    assert (loaded.horizon, loaded.action_dim, loaded.scale, loaded.vocab_size, loaded.min_token) == \
           (tok.horizon, tok.action_dim, tok.scale, tok.vocab_size, tok.min_token)
    chunks = smooth_chunks(100, seed=3)
    assert loaded.encode_batch(chunks) == tok.encode_batch(chunks)
    state = json.loads(path.read_text())
    del state["min_token"]
    path.write_text(json.dumps(state))
    with pytest.raises(KeyError, match=r"fast_tokenizer.json: missing key 'min_token'"):
        FastTokenizer.load(path)


def test_bpe_merges_match_hand_computation():
    # Corpus 0 1 0 1 2 / 0 1 2 2 2 / 2 2 0 1 1 (alphabet 0..2, overlapping pair counts):
    # (0,1)=4 (2,2)=3 (1,2)=2 ... -> merge (0,1)->3: 3 3 2 / 3 2 2 2 / 2 2 3 1; counts (2,2)=3 (3,2)=2 ...
    # -> merge (2,2)->4 (left to right): 3 3 2 / 3 4 2 / 4 3 1; every pair now occurs once -> stop.
    corpus = integer_chunks([[0, 1, 0, 1, 2], [0, 1, 2, 2, 2], [2, 2, 0, 1, 1]])
    tok = FastTokenizer.fit(corpus, vocab_size=10)
    assert (tok.min_token, tok.alphabet_size, tok.merges) == (0, 3, [(0, 1), (2, 2)])
    assert tok.encode_batch(corpus) == [[3, 3, 2], [3, 4, 2], [4, 3, 1]]
    assert tok.vocab_size == 10  # ids 5..9 exist but stand for nothing: decoding them is flagged invalid
    assert tok.decode([3, 3, 2], return_valid=True)[1] is True
    assert tok.decode([5, 3, 3, 2], return_valid=True)[1] is False  # right length, but 5 is not a token
    # the vocab budget stops merging too: 3 base ids + 1 merge
    assert FastTokenizer.fit(corpus, vocab_size=4).merges == [(0, 1)]
    # tie (0,1)=2 vs (2,1)=2 -> smallest pair first; then (2,1)=2 -> 4; then 4 4 / 3 3 -> stop
    tie = FastTokenizer.fit(integer_chunks([[2, 1, 2, 1], [0, 1, 0, 1]]), vocab_size=10)
    assert tie.merges == [(0, 1), (2, 1)]
    # encode applies merges lowest rank first: 2 1 0 1 -> (0,1) first -> 2 1 3 -> (2,1) -> 4 3
    assert tie.encode(np.array([[0.2, 0.1, 0.0, 0.1]])) == [4, 3]


def test_alphabet_larger_than_vocab_raises():
    with pytest.raises(ValueError, match=r"span \[0, 2\] at scale 10.0.*3 ids > vocab_size=2.*larger vocab_size or smaller scale"):
        FastTokenizer.fit(integer_chunks([[0, 1, 2]]), vocab_size=2)


def test_decode_never_raises_on_random_in_range_ids(fitted):
    tok, _ = fitted
    # independent expansion lengths: base ids are 1 symbol, merge r covers its two parts, unused ids none
    length = [1] * tok.alphabet_size + [0] * (tok.vocab_size - tok.alphabet_size)
    for r, (a, b) in enumerate(tok.merges):
        length[tok.alphabet_size + r] = length[a] + length[b]
    rng = np.random.default_rng(0)
    n_valid = 0
    for _ in range(1000):
        ids = rng.integers(0, tok.vocab_size, rng.integers(0, 3 * T * D + 1)).tolist()
        chunk, valid = tok.decode(ids, return_valid=True)
        assert chunk.shape == (T, D) and chunk.dtype == np.float32 and np.isfinite(chunk).all()
        used = tok.alphabet_size + len(tok.merges)
        assert valid == (sum(length[i] for i in ids) == T * D and all(i < used for i in ids))
        n_valid += valid
    assert n_valid < 1000
    assert tok.decode([], return_valid=True)[1] is False
    # relaxed decoding (processing_action_tokenizer.py): extra coefficients are cut, missing ones are zero (not min_token)
    base = rng.integers(0, tok.alphabet_size, T * D)
    coeff = (base + tok.min_token).reshape(T, D) / tok.scale
    np.testing.assert_allclose(tok.decode(base.tolist() + [0, 1]), dct_matrix(T).T @ coeff, atol=1e-6)
    coeff[3:] = 0
    np.testing.assert_allclose(tok.decode(base[:3 * D].tolist()), dct_matrix(T).T @ coeff, atol=1e-6)


def test_bad_inputs_raise_with_clear_messages(fitted):
    tok, _ = fitted
    with pytest.raises(ValueError, match=r"FAST id 256 out of range, valid ids are \[0, 256\)"):
        tok.decode([1, 256, 2])
    with pytest.raises(ValueError, match=r"FAST id -1 out of range"):
        tok.decode(np.array([-1]))
    with pytest.raises(ValueError, match=r"1-D sequence of ints"):
        tok.decode([1.5, 2.0])
    with pytest.raises(ValueError, match=r"expected chunk \[T, D\] = \[8, 7\], got shape \(7, 8\)"):
        tok.encode(np.zeros((7, 8)))
    with pytest.raises(ValueError, match=r"expected chunks \[N, T, D\] = \[N, 8, 7\], got shape \(2, 8, 6\)"):
        tok.encode_batch(np.zeros((2, 8, 6)))
    with pytest.raises(ValueError, match=r"NaN"):
        tok.encode(np.full((T, D), np.nan))


def test_out_of_range_coefficients_are_clipped(fitted):
    tok, _ = fitted
    big = 5.0 * np.ones((T, D))  # DC coefficient 5*sqrt(8)*10 = 141, far above the fitted max
    decoded, valid = tok.decode(tok.encode(big), return_valid=True)
    assert valid
    top = tok.min_token + tok.alphabet_size - 1
    np.testing.assert_allclose((dct_matrix(T) @ decoded)[0] * tok.scale, top, atol=1e-4)  # DC clipped to the max
