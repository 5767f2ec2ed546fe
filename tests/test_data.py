"""Data loading, tokenizers, vocabulary, batching and the synthetic bit strings."""

import gzip
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ddvae_fast.seqvae.data import (
    EncodedStrings,
    Vocabulary,
    batch_order,
    encode_strings,
    epoch_permutation,
    load_strings,
    tokenize_smiles,
)
from ddvae_fast.seqvae.synthetic import (
    bernoulli_distribution,
    sample_bernoulli_strings,
    total_variation,
)

# Real molecules (ZINC / drug SMILES) with two-letter atoms, bracket atoms,
# stereo, charges and a two-digit ring closure.
REAL_SMILES = [
    "CC(C)(C)c1ccc2occ(CC(=O)Nc3ccccc3F)c2c1",
    "C[C@@H]1CC(Nc2cncc(-c3nncn3C)c2)C[C@@H](C)C1",
    "N#Cc1ccc(-c2ccc(O[C@@H](C(=O)N3CCCC3)c3ccccc3)cc2)cc1",
    "CCOC(=O)[C@@H]1CCCN(C(=O)c2nc(-c3ccc(C)cc3)n3c2CCCCC3)C1",
    "Clc1ccc(Br)cc1",
    "c1ccc2[nH]ccc2c1",
    "C[NH+](C)CC[O-]",
    "C1CC2CCC3CCC4CCC5CCC6CCC7CCC8CCC9CCC%10CCC1C2C3C4C5C6C7C8C9%10",
    "O=C([O-])c1ccccc1/C=C/Cl",
]


@pytest.mark.parametrize(
    "smiles,tokens",
    [
        ("Clc1ccc(Br)cc1", ["Cl", "c", "1", "c", "c", "c", "(", "Br", ")", "c", "c", "1"]),
        ("c1cc[nH]c1", ["c", "1", "c", "c", "[nH]", "c", "1"]),
        ("C[C@@H](N)[O-]", ["C", "[C@@H]", "(", "N", ")", "[O-]"]),
        ("C%10CC%10", ["C", "%10", "C", "C", "%10"]),
        ("[13CH3]C#N", ["[13CH3]", "C", "#", "N"]),
        ("C/C=C\\Br", ["C", "/", "C", "=", "C", "\\", "Br"]),
    ],
)
def test_smiles_tokens(smiles, tokens):
    assert tokenize_smiles(smiles) == tokens


@pytest.mark.parametrize("smiles", REAL_SMILES)
def test_smiles_round_trip_real_molecules(smiles):
    tokens = tokenize_smiles(smiles)
    assert "".join(tokens) == smiles
    vocab = Vocabulary.build(REAL_SMILES, "smiles")
    assert vocab.decode(vocab.encode(smiles)) == smiles
    # Multi-character units are single tokens, never split.
    for unit in ("Cl", "Br", "[nH]", "[C@@H]", "%10", "[O-]", "[NH+]"):
        if unit in smiles:
            assert unit in tokens


_SMILES_UNITS = [
    "C",
    "N",
    "O",
    "c",
    "n",
    "o",
    "s",
    "F",
    "Cl",
    "Br",
    "[nH]",
    "[C@@H]",
    "[O-]",
    "[NH3+]",
    "(",
    ")",
    "=",
    "#",
    "1",
    "2",
    "%10",
    "%23",
    "/",
    "\\",
]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(_SMILES_UNITS), max_size=30))
def test_smiles_tokenizer_inverts_concatenation(units):
    # Every unit is a token, so splitting their concatenation gives them back.
    assert tokenize_smiles("".join(units)) == units


def test_smiles_tokenizer_rejects_unbalanced_brackets():
    for bad in ("C[nH", "C]C", "C[[nH]]"):
        with pytest.raises(ValueError, match="bracket"):
            tokenize_smiles(bad)


def test_vocabulary_layout_and_round_trip():
    vocab = Vocabulary.build(["0110", "1"], "char")
    assert vocab.itos[:4] == ["<pad>", "<bos>", "<eos>", "<unk>"]
    assert (vocab.pad, vocab.bos, vocab.eos, vocab.unk) == (0, 1, 2, 3)
    assert vocab.regular_tokens == ["0", "1"]
    assert vocab.encode("1001") == [5, 4, 4, 5]
    assert vocab.decode([5, 4, 4, 5]) == "1001"
    assert Vocabulary.from_dict(vocab.to_dict()) == vocab
    with pytest.raises(ValueError, match="regular token"):
        vocab.decode([vocab.eos])


def test_vocabulary_unknown_and_too_long():
    vocab = Vocabulary.build(["0110"], "char")
    with pytest.raises(ValueError, match="'2' in '012' is not in the vocabulary"):
        vocab.encode("012")
    assert vocab.encode("012", unknown="unk") == [4, 5, vocab.unk]
    with pytest.raises(ValueError, match="more than max_length=3"):
        vocab.encode("0110", max_length=3)
    with pytest.raises(ValueError, match="more than max_length"):
        EncodedStrings(["0", "0110"], vocab, max_length=2)
    with pytest.raises(TypeError):
        vocab.encode(5)
    with pytest.raises(ValueError, match="tokenizer"):
        Vocabulary.build(["a"], "words")


def test_encoded_table_layout_and_trimmed_batches():
    vocab = Vocabulary.build(["ab", "b", ""], "char")
    table = EncodedStrings(["ab", "b", ""], vocab)
    a, b = vocab.stoi["a"], vocab.stoi["b"]
    eos, pad = vocab.eos, vocab.pad
    assert table.tokens.tolist() == [[a, b, eos], [b, eos, pad], [eos, pad, pad]]
    assert table.lengths.tolist() == [3, 2, 1]
    batch = table.batch(np.array([2, 1]))
    assert batch.tokens.tolist() == [[eos, pad], [b, eos]]  # trimmed to its longest row
    assert batch.lengths.tolist() == [1, 2]
    whole = encode_strings(["b", "ab"], vocab)
    assert whole.tokens.dtype == torch.int64 and whole.tokens.shape == (2, 3)


def test_epoch_order_depends_only_on_seed_and_epoch():
    a = epoch_permutation(1000, seed=3, epoch=5)
    assert np.array_equal(a, epoch_permutation(1000, seed=3, epoch=5))
    assert not np.array_equal(a, epoch_permutation(1000, seed=3, epoch=6))
    assert not np.array_equal(a, epoch_permutation(1000, seed=4, epoch=5))
    batches = batch_order(1000, 128, seed=3, epoch=5)
    assert [len(b) for b in batches] == [128] * 7 + [104]
    assert np.array_equal(np.sort(np.concatenate(batches)), np.arange(1000))
    with pytest.raises(ValueError, match="batch_size"):
        batch_order(10, 0, 0, 0)


def test_load_text_smi_csv_and_gz(tmp_path):
    (tmp_path / "a.txt").write_text("0101\n\n 111 \n")
    assert load_strings(tmp_path / "a.txt") == ["0101", "111"]
    (tmp_path / "m.smi").write_text("CCO ethanol\nc1ccccc1\tbenzene\n")
    assert load_strings(tmp_path / "m.smi") == ["CCO", "c1ccccc1"]
    (tmp_path / "m.csv").write_text("SMILES,SPLIT\nCCO,train\nCCN,test\n")
    assert load_strings(tmp_path / "m.csv") == ["CCO", "CCN"]
    assert load_strings(tmp_path / "m.csv", column="SPLIT") == ["train", "test"]
    with gzip.open(tmp_path / "m.csv.gz", "wt") as handle:
        handle.write("id,smiles\n1,C[C@@H](O)Cl\n2,Br\n")
    assert load_strings(tmp_path / "m.csv.gz", column="smiles") == ["C[C@@H](O)Cl", "Br"]
    assert load_strings(["x", "y"]) == ["x", "y"]
    # The authors' synthetic data file: a gzipped CSV without a header row.
    with gzip.open(tmp_path / "bits.csv.gz", "wt") as handle:
        handle.write("010111\n111111\n")
    assert load_strings(tmp_path / "bits.csv.gz", header=False) == ["010111", "111111"]
    with pytest.raises(ValueError, match="header"):
        load_strings(tmp_path / "bits.csv.gz", column="x", header=False)


def test_load_errors(tmp_path):
    (tmp_path / "empty.smi").write_text("\n  \n")
    with pytest.raises(ValueError, match="contains no strings"):
        load_strings(tmp_path / "empty.smi")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match="is empty"):
        load_strings(tmp_path / "empty.csv")
    (tmp_path / "header.csv").write_text("smiles\n")
    with pytest.raises(ValueError, match="contains no strings"):
        load_strings(tmp_path / "header.csv")
    (tmp_path / "m.csv").write_text("smiles\nCCO\n")
    with pytest.raises(ValueError, match="column 'SMILES' not in"):
        load_strings(tmp_path / "m.csv", column="SMILES")
    with pytest.raises(FileNotFoundError):
        load_strings(tmp_path / "missing.smi")
    with pytest.raises(ValueError, match="empty"):
        load_strings([])
    with pytest.raises(TypeError):
        load_strings(["a", 3])


def test_bernoulli_distribution_matches_the_paper():
    dist = bernoulli_distribution(6, 0.8)
    assert len(dist) == 64
    assert math.isclose(sum(dist.values()), 1.0, rel_tol=0, abs_tol=1e-12)
    # Section 4.1: P("110101") = 0.8^4 0.2^2 ~ 0.016.
    assert math.isclose(dist["110101"], 0.8**4 * 0.2**2, rel_tol=1e-12)
    assert math.isclose(dist["111111"], 0.8**6, rel_tol=1e-12)


def test_synthetic_sample_is_fixed_and_follows_the_distribution():
    strings = sample_bernoulli_strings(100_000, 6, 0.8, seed=0)
    assert strings == sample_bernoulli_strings(100_000, 6, 0.8, seed=0)
    assert strings != sample_bernoulli_strings(100_000, 6, 0.8, seed=1)
    assert all(len(s) == 6 and set(s) <= {"0", "1"} for s in strings[:1000])
    dist = bernoulli_distribution(6, 0.8)
    counts = {}
    for s in strings:
        counts[s] = counts.get(s, 0) + 1
    empirical = {s: c / len(strings) for s, c in counts.items()}
    # TV of an n-sample empirical distribution over 64 cells is O(sqrt(64/n)) ~ 0.025;
    # 0.02 bounds it for this seed with room (it is ~0.006).
    assert total_variation(dist, empirical) < 0.02
    ones = sum(s.count("1") for s in strings) / (6 * len(strings))
    assert abs(ones - 0.8) < 0.005  # binomial sd of the mean is 0.0005


def test_total_variation_counts_lost_mass():
    true = {"a": 0.5, "b": 0.5}
    assert total_variation(true, true) == 0.0
    assert total_variation(true, {"a": 0.5, None: 0.5}) == pytest.approx(0.5)
    assert total_variation(true, {"a": 0.25, "b": 0.25, "zz": 0.5}) == pytest.approx(0.5)
    assert total_variation(true, {"c": 1.0}) == pytest.approx(1.0)


def test_bucketed_batches_cover_every_index_once_reproducibly_and_cut_padding():
    from ddvae_fast.seqvae.data import BUCKET_POOL, batch_order

    rng = np.random.default_rng(0)
    n, batch_size = 3 * BUCKET_POOL * 8 + 5, 8  # three pools, the last one partial
    lengths = rng.integers(5, 60, size=n)
    bucketed = batch_order(n, batch_size, seed=3, epoch=2, lengths=lengths)
    assert sorted(np.concatenate(bucketed).tolist()) == list(range(n))
    again = batch_order(n, batch_size, seed=3, epoch=2, lengths=lengths)
    assert all(np.array_equal(a, b) for a, b in zip(bucketed, again))  # exact resume
    other = batch_order(n, batch_size, seed=3, epoch=3, lengths=lengths)
    assert not all(np.array_equal(a, b) for a, b in zip(bucketed, other))

    def padding(batches):
        return sum(int(lengths[b].max()) * len(b) - int(lengths[b].sum()) for b in batches)

    plain = batch_order(n, batch_size, seed=3, epoch=2)
    assert padding(bucketed) < 0.25 * padding(plain)
    with pytest.raises(ValueError, match="lengths"):
        batch_order(n, batch_size, seed=3, epoch=2, lengths=lengths[:-1])
