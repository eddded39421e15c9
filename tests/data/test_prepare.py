"""The data pipeline: loading every file type, formats, masking, errors, truncation, packing, batching."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from qdora.data.batches import BatchIterator
from qdora.data.formats import ALPACA_PROMPT_INPUT, alpaca_prompt
from qdora.data.pack import RaggedRows, pack_examples
from qdora.data.prepare import prepare_data
from qdora.errors import QdoraError
from qdora.testing.demo_data import demo_corpus, demo_records
from qdora.testing.tiny_tokenizers import build_bpe_tokenizer

SEQ = 320  # the tiny tokenizer spends ~120 tokens on an Alpaca prompt

CHATS = [
    {"messages": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What colour is the cat?"},
        {"role": "assistant", "content": "The cat is red."},
        {"role": "user", "content": "And the dog?"},
        {"role": "assistant", "content": "The dog is blue."},
    ]},
    {"messages": [
        {"role": "user", "content": "Count the stars."},
        {"role": "assistant", "content": "It counts 12 stars."},
    ]},
]


@pytest.fixture(scope="module")
def tok():
    return build_bpe_tokenizer()


def _jsonl(path, records, blank_after: int | None = None):
    with open(path, "w") as f:
        for i, r in enumerate(records):
            f.write(json.dumps(r) + "\n")
            if blank_after is not None and i == blank_after:
                f.write("\n")
    return path


def _trained_text(tok, labels: torch.Tensor) -> str:
    return tok.decode(labels[labels != -100].tolist())


def _examples(data):
    """Unpadded (ids, labels) per row of a non-packed PreparedData, in file order."""
    return [tuple(a.tolist() for a in data.rows.example(i)) for i in range(len(data.rows))]


# ---------------------------------------------------------------- loading each file type


def test_every_file_type_loads_the_same_alpaca_examples(tok, tmp_path):
    import datasets

    records = demo_records(6)
    ref = _examples(prepare_data(_jsonl(tmp_path / "a.jsonl", records), tok, SEQ))
    (tmp_path / "a.json").write_text(json.dumps(records))
    ds = datasets.Dataset.from_list(records)
    ds.to_csv(tmp_path / "a.csv", index=False)
    ds.to_parquet(tmp_path / "a.parquet")
    ds.save_to_disk(tmp_path / "saved")
    datasets.DatasetDict({"train": ds}).save_to_disk(tmp_path / "saved_dict")
    for name in ["a.json", "a.csv", "a.parquet", "saved", "saved_dict"]:
        data = prepare_data(tmp_path / name, tok, SEQ)
        assert data.stats.formats[str(tmp_path / name)] == "alpaca"
        assert _examples(data) == ref, name


def test_loading_never_touches_the_network(tok, tmp_path, monkeypatch):
    import socket

    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access during data loading")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    records = demo_records(3)
    prepare_data(_jsonl(tmp_path / "a.jsonl", records), tok, SEQ)
    (tmp_path / "b.txt").write_text("one line\n")
    prepare_data(tmp_path / "b.txt", tok, SEQ)
    assert attempts == []


def test_folder_of_files_concatenates_in_name_order(tok, tmp_path):
    import datasets

    records = demo_records(6)
    folder = tmp_path / "folder"
    folder.mkdir()
    _jsonl(folder / "1.jsonl", records[:2])
    datasets.Dataset.from_list(records[2:4]).to_parquet(folder / "2.parquet")
    datasets.Dataset.from_list(records[4:]).save_to_disk(folder / "3_saved")
    (folder / "notes.md").write_text("ignored")
    whole = _examples(prepare_data(_jsonl(tmp_path / "all.jsonl", records), tok, SEQ))
    data = prepare_data(folder, tok, SEQ)
    assert len(data.stats.formats) == 3
    assert _examples(data) == whole


def test_txt_by_line_and_by_file(tok, tmp_path):
    lines = demo_corpus(5)
    path = tmp_path / "c.txt"
    path.write_text(lines[0] + "\n\n" + "\n".join(lines[1:]) + "\n")
    by_line = prepare_data(path, tok, SEQ)
    assert by_line.stats.formats[str(path)] == "text" and len(by_line.rows) == 5
    assert by_line.stats.dropped == 1  # the blank line
    ids, labels = by_line.rows.example(0)
    assert ids.tolist() == labels.tolist()
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.decode(ids[1:-1].tolist()) == lines[0]
    by_file = prepare_data(path, tok, 1024, txt_mode="file")
    assert len(by_file.rows) == 1
    assert tok.decode(by_file.rows.example(0)[0][1:-1].tolist()).split() == " ".join(lines).split()


def test_missing_path_unsupported_type_and_empty_folder(tok, tmp_path):
    with pytest.raises(QdoraError, match="not found"):
        prepare_data(tmp_path / "nope.jsonl", tok, SEQ)
    (tmp_path / "x.xml").write_text("<a/>")
    with pytest.raises(QdoraError, match="unsupported file type '.xml'"):
        prepare_data(tmp_path / "x.xml", tok, SEQ)
    (tmp_path / "empty").mkdir()
    with pytest.raises(QdoraError, match="no data files"):
        prepare_data(tmp_path / "empty", tok, SEQ)


def test_empty_dataset_after_filtering(tok, tmp_path):
    (tmp_path / "blank.txt").write_text("\n  \n\n")
    with pytest.raises(QdoraError, match="no training examples"):
        prepare_data(tmp_path / "blank.txt", tok, SEQ)


# ---------------------------------------------------------------- formats and detection


def test_auto_detects_each_format(tok, tmp_path):
    text = _jsonl(tmp_path / "t.jsonl", [{"text": s, "id": i} for i, s in enumerate(demo_corpus(3))])
    alpaca = _jsonl(tmp_path / "a.jsonl", demo_records(3))
    chat = _jsonl(tmp_path / "c.jsonl", CHATS)
    for path, fmt in [(text, "text"), (alpaca, "alpaca"), (chat, "chat")]:
        assert prepare_data(path, tok, SEQ).stats.formats[str(path)] == fmt


def test_auto_refuses_ambiguous_and_unknown_columns(tok, tmp_path):
    both = _jsonl(tmp_path / "both.jsonl", [{"text": "a b", "messages": CHATS[1]["messages"]}])
    with pytest.raises(QdoraError, match="matches several formats") as e:
        prepare_data(both, tok, SEQ)
    assert "['messages', 'text']" in str(e.value) and "alpaca (columns: instruction, output)" in str(e.value)
    other = _jsonl(tmp_path / "other.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(QdoraError, match=r"columns \['answer', 'question'\] matches no format") as e:
        prepare_data(other, tok, SEQ)
    assert "chat (columns: messages)" in str(e.value) and "other.jsonl" in str(e.value)
    with pytest.raises(QdoraError, match=r"format 'alpaca' needs column\(s\) \['instruction', 'output'\]"):
        prepare_data(other, tok, SEQ, fmt="alpaca")
    with pytest.raises(QdoraError, match="unknown data format 'sharegpt'"):
        prepare_data(other, tok, SEQ, fmt="sharegpt")


def test_alpaca_rendering_and_completion_only_mask(tok, tmp_path):
    records = demo_records(4)
    records[1]["input"] = "Think of a farm."
    path = _jsonl(tmp_path / "a.jsonl", records)
    masked = prepare_data(path, tok, SEQ, completion_only=True)
    full = prepare_data(path, tok, SEQ)
    for i, r in enumerate(records):
        ids, labels = masked.rows.example(i)
        assert tok.decode(labels[labels != -100].tolist()) == r["output"] + tok.eos_token
        assert tok.decode(ids.tolist()) == tok.bos_token + alpaca_prompt(r["instruction"], r["input"]) + (
            r["output"] + tok.eos_token
        )
        trained = labels != -100
        assert trained.sum() > 0 and not trained[: len(ids) - trained.sum()].any()  # one trailing span
        assert (labels[trained] == ids[trained]).all()
        f_ids, f_labels = full.rows.example(i)
        assert (f_ids == ids).all() and (f_labels == f_ids).all()
    assert "### Input:\nThink of a farm." in tok.decode(masked.rows.example(1)[0].tolist())
    assert ALPACA_PROMPT_INPUT.startswith("Below is an instruction")


def test_chat_completion_only_trains_exactly_the_assistant_turns(tok, tmp_path):
    path = _jsonl(tmp_path / "c.jsonl", CHATS)
    data = prepare_data(path, tok, SEQ, completion_only=True)
    for i, chat in enumerate(CHATS):
        ids, labels = data.rows.example(i)
        # Same ids as the template tokenized in one go (segment-wise tokenization changes nothing here).
        assert ids.tolist() == tok.apply_chat_template(chat["messages"], tokenize=True, return_dict=False)
        assert (labels[labels != -100] == ids[labels != -100]).all()
        replies = [m["content"] + "<|eot_id|>" for m in chat["messages"] if m["role"] == "assistant"]
        assert _trained_text(tok, torch.from_numpy(labels)) == "".join(replies)
        # and the trained tokens form one contiguous run per assistant turn
        starts = ((labels[1:] != -100) & (labels[:-1] == -100)).sum()
        assert starts == len(replies)
    unmasked = prepare_data(path, tok, SEQ)
    ids, labels = unmasked.rows.example(0)
    assert (ids == labels).all()


CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_chat_masking_with_another_template_and_a_non_prefix_template(tok, tmp_path):
    path = _jsonl(tmp_path / "c.jsonl", CHATS)
    chatml = build_bpe_tokenizer()
    chatml.chat_template = CHATML
    data = prepare_data(path, chatml, 1024, completion_only=True)
    ids, labels = data.rows.example(0)
    expected = "The cat is red.<|im_end|>\nThe dog is blue.<|im_end|>\n"
    assert _trained_text(chatml, torch.from_numpy(labels)) == expected
    weird = build_bpe_tokenizer()  # renders the last turn differently: assistant spans cannot be found
    weird.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}{% if loop.last %}{{ ' [end]' }}"
        "{% else %}{{ '\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '\nassistant: ' }}{% endif %}"
    )
    with pytest.raises(QdoraError, match=r"c\.jsonl, line 1: the tokenizer's chat template does not render"):
        prepare_data(path, weird, 1024, completion_only=True)


def test_conversation_opening_with_an_assistant_turn(tok, tmp_path):
    chat = {"messages": [{"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Hi."}]}
    data = prepare_data(_jsonl(tmp_path / "c.jsonl", [chat]), tok, SEQ, completion_only=True)
    ids, labels = data.rows.example(0)
    assert _trained_text(tok, torch.from_numpy(labels)) == "Hello.<|eot_id|>"
    assert tok.decode(ids[: (labels != -100).argmax()].tolist()).endswith("assistant<|end_header_id|>\n\n")


def test_chat_without_template_and_text_with_completion_only(tok, tmp_path):
    bare = build_bpe_tokenizer()
    bare.chat_template = None
    with pytest.raises(QdoraError, match="no chat template|has none"):
        prepare_data(_jsonl(tmp_path / "c.jsonl", CHATS), bare, SEQ)
    with pytest.raises(QdoraError, match="completion_only needs a prompt/response format"):
        prepare_data(_jsonl(tmp_path / "t.jsonl", [{"text": "a"}]), tok, SEQ, completion_only=True)


# ---------------------------------------------------------------- malformed records


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"instruction": "q"}, "missing field 'output'"),
        ({"instruction": "q", "output": 5}, "field 'output' is int, but str on line 1"),
        ({"instruction": ["q"], "output": "a"}, "field 'instruction' is list, but str on line 1"),
    ],
)
def test_malformed_alpaca_jsonl_names_file_and_line(tok, tmp_path, bad, message):
    records = demo_records(4)
    records[2] = bad
    path = _jsonl(tmp_path / "bad.jsonl", records, blank_after=0)  # a blank line: row 3 is line 4
    with pytest.raises(QdoraError) as e:
        prepare_data(path, tok, SEQ, fmt="alpaca")
    assert f"{path}, line 4: {message}" in str(e.value)


@pytest.mark.parametrize(
    "messages, message",
    [
        ([], "'messages' is empty"),
        ([{"role": "user", "content": 5}], "message 1 field 'content' must be a string (int)"),
        (
            [{"role": "user", "content": "hi"}, {"content": "x"}],
            "message 2 field 'role' must be a string (missing)",
        ),
        ("hello", "'messages' must be a list, got str"),
    ],
)
def test_malformed_chat_names_file_and_line(tok, tmp_path, messages, message):
    path = _jsonl(tmp_path / "bad.jsonl", [CHATS[1], {"messages": messages}])
    with pytest.raises(QdoraError) as e:
        prepare_data(path, tok, SEQ, fmt="chat")
    assert f"{path}, line 2: {message}" in str(e.value)


def test_malformed_rows_in_other_files_name_the_row(tok, tmp_path):
    import datasets

    records = demo_records(3)
    records[1]["output"] = None
    datasets.Dataset.from_list(records).to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(QdoraError, match=r"bad\.parquet, row 2: missing field 'output'"):
        prepare_data(tmp_path / "bad.parquet", tok, SEQ)
    (tmp_path / "bad.json").write_text(json.dumps(records))
    with pytest.raises(QdoraError, match=r"bad\.json, row 2: missing field 'output'"):
        prepare_data(tmp_path / "bad.json", tok, SEQ)


def test_wrong_type_in_a_whole_column_and_numbers_in_csv(tok, tmp_path):
    records = [{**r, "output": i} for i, r in enumerate(demo_records(3))]
    with pytest.raises(QdoraError, match=r"ints\.jsonl, line 1: field 'output' must be a string, got int"):
        prepare_data(_jsonl(tmp_path / "ints.jsonl", records), tok, SEQ)
    (tmp_path / "n.csv").write_text("instruction,output\nAdd 1 and 1.,2\nAdd 2 and 2.,\n")
    with pytest.raises(QdoraError, match=r"n\.csv, row 2: missing field 'output'"):
        prepare_data(tmp_path / "n.csv", tok, SEQ)
    (tmp_path / "n.csv").write_text("instruction,output\nAdd 1 and 1.,2\nAdd 2 and 2.,4\n")
    data = prepare_data(tmp_path / "n.csv", tok, SEQ, completion_only=True)
    assert tok.decode(data.rows.example(1)[1][-2:].tolist()) == "4" + tok.eos_token


def test_invalid_json_line_is_reported(tok, tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(demo_records(1)[0]) + "\n" + '{"instruction": "q", "output": \n')
    with pytest.raises(QdoraError, match=r"broken\.jsonl, line 2: invalid JSON"):
        prepare_data(path, tok, SEQ)


# ---------------------------------------------------------------- truncation


def test_truncation_warns_once_with_the_count(tok, tmp_path, caplog):
    corpus = demo_corpus(6)
    corpus[1] = " ".join(corpus[:5])
    corpus[4] = " ".join(corpus[2:6])
    path = _jsonl(tmp_path / "t.jsonl", [{"text": s} for s in corpus])
    lengths = [len(tok(s)["input_ids"]) + 1 for s in corpus]
    seq = sorted(lengths)[-3] + 1  # exactly two examples are longer
    with caplog.at_level(logging.WARNING, logger="qdora.data.prepare"):
        data = prepare_data(path, tok, seq)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "2 of 6 examples were longer than seq_len" in warnings[0].getMessage()
    assert data.stats.truncated == 2
    assert max(len(data.rows.example(i)[0]) for i in range(6)) == seq
    with pytest.raises(QdoraError, match=rf"t\.jsonl, line 2: {lengths[1]} tokens, more than seq_len {seq}"):
        prepare_data(path, tok, seq, truncate=False)


def test_prompt_filling_seq_len_is_dropped(tok, tmp_path):
    records = demo_records(3)
    records[0]["input"] = " ".join(demo_corpus(20))  # prompt far longer than SEQ: no response tokens left
    data = prepare_data(_jsonl(tmp_path / "a.jsonl", records), tok, SEQ, completion_only=True)
    assert len(data.rows) == 2 and data.stats.dropped == 1 and data.stats.truncated == 1


# ---------------------------------------------------------------- packing and padding


examples_strategy = st.lists(
    st.integers(2, 16).flatmap(
        lambda n: st.tuples(
            st.lists(st.integers(5, 300), min_size=n, max_size=n),
            st.lists(st.booleans(), min_size=n, max_size=n),
        )
    ),
    min_size=1,
    max_size=25,
)


@settings(max_examples=60, deadline=None)
@given(examples_strategy, st.integers(16, 40))
def test_packing_invariants(raw, seq_len):
    examples = [(ids, [t if keep else -100 for t, keep in zip(ids, mask, strict=True)]) for ids, mask in raw]
    rows = pack_examples(examples, seq_len, pad_id=1)
    assert rows.input_ids.shape == rows.labels.shape == rows.position_ids.shape == (len(rows), seq_len)
    # Walking the rows by position-id restarts recovers every example, in order, whole.
    real, used, first_len = [], [], []
    for r in range(len(rows)):
        ids, labels, pos = rows.input_ids[r], rows.labels[r], rows.position_ids[r]
        starts = [i for i in range(seq_len) if pos[i] == 0] + [seq_len]
        segments = []
        for a, b in zip(starts, starts[1:], strict=False):
            assert list(pos[a:b]) == list(range(b - a))
            segments.append((ids[a:b].tolist(), labels[a:b].tolist()))
        if segments[-1][0][0] == 1:  # the padding tail (real ids are >= 5): pad ids, no labels
            pad_ids, pad_labels = segments.pop()
            assert set(pad_ids) == {1} and set(pad_labels) == {-100}
        assert segments, "no empty rows"
        real += segments
        used.append(sum(len(ids) for ids, _ in segments))
        first_len.append(len(segments[0][0]))
    assert [ids for ids, _ in real] == [ids for ids, _ in examples]
    assert [lab for _, lab in real] == [[-100] + lab[1:] for _, lab in examples]
    # Greedy: a row is closed only when the next example would not have fitted in it.
    assert all(used[r] + first_len[r + 1] > seq_len for r in range(len(rows) - 1))


def test_padding_collate():
    rows = RaggedRows([([5, 6, 7], [-100, 6, 7]), ([8, 9], [8, 9]), ([10], [10])], pad_id=1)
    batch = rows.collate([0, 1])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 1]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, 9, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert "position_ids" not in batch


def test_packed_examples_attend_only_to_themselves(tok, tmp_path):
    """transformers' Llama (sdpa, CPU) turns restarting position_ids into a block-diagonal causal mask,
    but only with use_cache=False and no attention_mask: both traps are checked here."""
    from transformers import AutoModelForCausalLM

    from qdora.testing.tiny_models import tiny_config
    from qdora.train.loss import chunked_cross_entropy

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(vocab_size=448), attn_implementation="sdpa").eval()
    path = _jsonl(tmp_path / "c.jsonl", CHATS)
    packed = prepare_data(path, tok, 256, completion_only=True, pack=True)
    plain = prepare_data(path, tok, 256, completion_only=True)
    assert len(packed.rows) == 1
    batch = packed.rows.collate([0])
    ids, pos = batch["input_ids"], batch["position_ids"]
    a = len(plain.rows.example(0)[0])
    b = a + len(plain.rows.example(1)[0])
    with torch.no_grad():
        alone = model(input_ids=plain.rows.collate([1])["input_ids"], use_cache=False).logits[0]
        out = model(input_ids=ids, position_ids=pos, use_cache=False).logits[0]
        torch.testing.assert_close(out[a:b], alone, atol=1e-5, rtol=1e-4)
        # With a cache (the config default) or an attention_mask, packed detection is off: attention leaks.
        cached = model(input_ids=ids, position_ids=pos).logits[0]
        masked = model(input_ids=ids, position_ids=pos, attention_mask=torch.ones_like(ids), use_cache=False)
        assert not torch.allclose(cached[a:b], alone, atol=1e-3)
        assert not torch.allclose(masked.logits[0, a:b], alone, atol=1e-3)
        # The packed loss is exactly the sum of the separate losses.
        hidden = model.model(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state
        packed_sum, packed_n = chunked_cross_entropy(hidden, model.lm_head.weight, batch["labels"], 64)
        sep_sum, sep_n = 0.0, 0
        for i in range(2):
            one = plain.rows.collate([i])
            h = model.model(input_ids=one["input_ids"], use_cache=False).last_hidden_state
            s, n = chunked_cross_entropy(h, model.lm_head.weight, one["labels"], 64)
            sep_sum, sep_n = sep_sum + s, sep_n + n
    assert packed_n == sep_n
    torch.testing.assert_close(packed_sum, sep_sum, atol=1e-4, rtol=1e-5)


# ---------------------------------------------------------------- the batch iterator


def _rows(n: int = 23) -> RaggedRows:
    return RaggedRows([([i] * (1 + i % 4), [i] * (1 + i % 4)) for i in range(n)], pad_id=-1)


def _row_ids(batch) -> list[int]:
    return batch["input_ids"][:, 0].tolist()


def test_iterator_epochs_lengths_and_determinism():
    it = BatchIterator(_rows(), micro_batch=4, epochs=3, seed=7)
    assert it.steps_per_epoch == 5 and len(it) == 15
    batches = [_row_ids(b) for b in it]
    assert len(batches) == 15 and all(len(b) == 4 for b in batches)
    for e in range(3):
        seen = [r for b in batches[5 * e : 5 * e + 5] for r in b]
        assert len(set(seen)) == 20  # no repeats within an epoch
    assert batches[:5] != batches[5:10]  # reshuffled per epoch
    assert batches == [_row_ids(b) for b in BatchIterator(_rows(), micro_batch=4, epochs=3, seed=7)]
    assert batches != [_row_ids(b) for b in BatchIterator(_rows(), micro_batch=4, epochs=3, seed=8)]
    assert [_row_ids(b) for b in BatchIterator(_rows(), 4, shuffle=False)][0] == [0, 1, 2, 3]


@pytest.mark.parametrize("stop_after", [0, 3, 5, 7, 14, 15])
def test_iterator_resume_reproduces_the_uninterrupted_run(stop_after):
    full = [b for b in BatchIterator(_rows(), micro_batch=4, epochs=3, seed=3)]
    first = BatchIterator(_rows(), micro_batch=4, epochs=3, seed=3)
    stream = iter(first)
    got = [next(stream) for _ in range(stop_after)]  # batches consumed (e.g. trained on) before the save
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint round trip
    resumed = BatchIterator(_rows(), micro_batch=4, epochs=3, seed=3)
    resumed.load_state_dict(state)
    assert resumed.remaining() == 15 - stop_after
    got += list(resumed)
    assert len(got) == len(full)
    for a, b in zip(got, full, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_rank_sharding_equals_one_process_with_the_global_batch():
    rows = _rows(30)
    single = list(BatchIterator(rows, micro_batch=6, epochs=2, seed=5))
    ranks = [
        list(BatchIterator(rows, micro_batch=2, epochs=2, seed=5, rank=r, world_size=3)) for r in range(3)
    ]
    assert all(len(r) == len(single) == 10 for r in ranks)
    for step, whole in enumerate(single):
        parts = [_row_ids(ranks[r][step]) for r in range(3)]
        assert sum(parts, []) == _row_ids(whole)
        assert len(set(parts[0]) & set(parts[1])) == 0


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 60), st.integers(1, 4), st.integers(1, 4), st.integers(1, 3), st.integers(0, 99))
def test_sharding_and_resume_for_any_layout(n, micro, world, epochs, cut):
    assume(n >= micro * world)
    rows = _rows(n)
    single = [_row_ids(b) for b in BatchIterator(rows, micro * world, epochs, seed=n)]
    for r in range(world):
        it = BatchIterator(rows, micro, epochs, seed=n, rank=r, world_size=world)
        stream = iter(it)
        head = [_row_ids(next(stream)) for _ in range(cut % (len(it) + 1))]
        resumed = BatchIterator(rows, micro, epochs, seed=n, rank=r, world_size=world)
        resumed.load_state_dict(it.state_dict())
        mine = head + [_row_ids(b) for b in resumed]
        assert mine == [whole[r * micro : (r + 1) * micro] for whole in single]


def test_iterator_refuses_bad_resume_and_tiny_datasets():
    it = BatchIterator(_rows(), micro_batch=4, seed=1)
    with pytest.raises(QdoraError, match="seed was 1 when saved, now 2"):
        BatchIterator(_rows(), micro_batch=4, seed=2).load_state_dict(it.state_dict())
    with pytest.raises(QdoraError, match="world_size was 1 when saved, now 2"):
        BatchIterator(_rows(), micro_batch=2, seed=1, world_size=2).load_state_dict(
            {**it.state_dict(), "micro_batch": 2}
        )
    with pytest.raises(QdoraError, match="fewer than one global batch"):
        BatchIterator(_rows(5), micro_batch=4, world_size=2)
    with pytest.raises(QdoraError, match="rank 2 is outside world_size 2"):
        BatchIterator(_rows(), micro_batch=1, rank=2, world_size=2)


def test_prepared_data_batches_end_to_end(tok, tmp_path):
    path = _jsonl(tmp_path / "a.jsonl", demo_records(12))
    packed = prepare_data(path, tok, SEQ, completion_only=True, pack=True)
    assert packed.packed and len(packed.rows) == 6
    batch = next(iter(packed.batches(micro_batch=2, seed=0)))
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert batch["input_ids"].shape == (2, SEQ) and batch["input_ids"].dtype == torch.int64
    plain = prepare_data(path, tok, SEQ, completion_only=True)
    batch = next(iter(plain.batches(micro_batch=3)))
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    assert plain.stats.trained_tokens == packed.stats.trained_tokens == sum(
        len(tok(r["output"], add_special_tokens=False)["input_ids"]) + 1 for r in demo_records(12)
    )
