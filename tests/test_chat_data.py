"""Chat and instruction data: rendered with the tokenizer's own chat template, a loss mask equal to the prefix-rendering
reference, conversations packed whole with resetting positions and IGNORE_INDEX labels on untrained tokens, BOS for
plain text, and bad input refused in one line with nothing written."""
import dataclasses
import json

import pytest
import torch

from megalysses.config import ConfigError, DataConfig, RunConfig, TrainConfig
from megalysses.data import BatchLoader, IndexedDataset, PackedCorpus, PackedDataset, check_data_against_model
from megalysses.data.indexed import dataset_paths, mask_path
from megalysses.models.config import GPTConfig
from megalysses.parallel.sequence import IGNORE_INDEX
from megalysses.tools.preprocess import main

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

SPECIALS = ["<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>", "<|end|>"]
MARKERS = "{% if m['role'] == 'system' %}<|system|>{% elif m['role'] == 'user' %}<|user|>" \
          "{% elif m['role'] == 'tool' %}<|tool|>{% endif %}"
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}<|assistant|>{% generation %}"
            "{{ m['content'] }}<|end|>\n{% endgeneration %}{% else %}" + MARKERS + "{{ m['content'] }}<|end|>\n"
            "{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
NO_TOOL_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
                    "{% if add_generation_prompt %}<|assistant|>{% endif %}")
COUNTING_TEMPLATE = "{{ bos_token }}[{{ messages | length }}]" + NO_TOOL_TEMPLATE[len("{{ bos_token }}"):]

CONVERSATIONS = [
    [{"role": "user", "content": "Hello there, how are you?"}, {"role": "assistant", "content": "Fine, thanks!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Two plus two?"},
     {"role": "assistant", "content": "Four."}, {"role": "user", "content": "And three plus three?"},
     {"role": "assistant", "content": "Six, of course."}],
    [{"role": "user", "content": "What is the weather?"}, {"role": "assistant", "content": "Let me look."},
     {"role": "tool", "content": "{\"sky\": \"clear\"}"}, {"role": "assistant", "content": "The sky is clear."}],
    [{"role": "user", "content": "Only a question, no answer yet."}],
    [{"role": "user", "content": "héllo ünïcode ✓"}, {"role": "assistant", "content": "日本語 ✓ 𝄞"}],
]


def save_tokenizer(folder, template=TEMPLATE, bos=True):
    """A byte-level BPE tokenizer trained on the test conversations, saved by transformers with a chat template."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([m["content"] for c in CONVERSATIONS for m in c] * 3, trainer)
    if bos:  # add_special_tokens=True puts <s> first, as Llama's tokenizer.json does
        tok.post_processor = tokenizers.processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                chat_template=template)
    fast.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return save_tokenizer(tmp_path_factory.mktemp("chat_tok"))


@pytest.fixture(scope="module")
def hf_tok(tok_dir):
    return transformers.AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def run(args, capsys):
    """main(args) in-process: (exit code, stderr)."""
    code = main([str(a) for a in args] + ["--progress-every", "1e9"])
    return code, capsys.readouterr().err


def tokens(hf_tok, messages, generation_prompt=False):
    return hf_tok.apply_chat_template(messages, tokenize=True, return_dict=False,
                                      add_generation_prompt=generation_prompt) if messages else []


def reference_mask(hf_tok, messages):
    """Trained = the tokens between render(messages[:i], generation prompt) and render(messages[:i + 1])."""
    full = tokens(hf_tok, messages)
    mask = [0] * len(full)
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            start, end = tokens(hf_tok, messages[:i], True), tokens(hf_tok, messages[: i + 1])
            assert full[: len(start)] == start and full[: len(end)] == end
            mask[len(start): len(end)] = [1] * (len(end) - len(start))
    return full, mask


def test_mask_matches_the_prefix_reference_and_trains_exactly_the_replies(tmp_path, tok_dir, hf_tok, capsys):
    src = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in CONVERSATIONS])
    code, err = run([src, "-o", tmp_path / "sft", "--tokenizer", tok_dir, "--workers", 1], capsys)
    assert code == 0, err
    data = IndexedDataset(tmp_path / "sft")
    meta = data.meta
    assert meta["version"] == 2 and meta["loss_mask"] == "uint8" and meta["records"] == "messages"
    assert meta["records_chosen_by"].startswith("auto") and meta["tokenizer_dir"] == str(tok_dir)
    assert meta["num_trained_tokens"] == int(data.loss_mask.sum()) > 0
    assert meta["max_document_tokens"] == int(data.lengths.max())
    for i, conv in enumerate(CONVERSATIONS):
        full, mask = reference_mask(hf_tok, conv)
        lo, hi = int(data.offsets[i]), int(data.offsets[i + 1])
        assert data.document(i).tolist() == full and full[0] == hf_tok.bos_token_id
        assert data.loss_mask[lo:hi].tolist() == mask
        # an independent reference: the template's {% generation %} blocks, as transformers reads them
        marked = hf_tok.apply_chat_template(conv, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        assert marked["assistant_masks"] == mask
        trained = [t for t, m in zip(full, mask) if m]
        replies = "".join(m["content"] + "<|end|>\n" for m in conv if m["role"] == "assistant")
        assert hf_tok.decode(trained) == replies


def test_workers_write_identical_files_and_prompt_completion_records(tmp_path, tok_dir, hf_tok, capsys):
    src = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in CONVERSATIONS] * 3)
    for workers in (1, 2):
        assert run([src, "-o", tmp_path / f"w{workers}", "--tokenizer", tok_dir, "--workers", workers,
                    "--chunk-docs", 2], capsys)[0] == 0
    for path in (*dataset_paths(tmp_path / "w1").values(), mask_path(tmp_path / "w1")):
        if path.suffix != ".json":
            assert path.read_bytes() == path.with_name(path.name.replace("w1", "w2")).read_bytes()
    records = [{"prompt": "Two plus two?", "completion": "Four."},
               {"prompt": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}],
                "completion": [{"role": "assistant", "content": "Hello."}]}]
    code, err = run([write_jsonl(tmp_path / "pc.jsonl", records), "-o", tmp_path / "pc", "--tokenizer", tok_dir,
                     "--records", "prompt-completion"], capsys)
    assert code == 0, err
    data = IndexedDataset(tmp_path / "pc")
    assert data.meta["records"] == "prompt-completion" and data.meta["records_chosen_by"] == "--records"
    convs = [[{"role": "user", "content": "Two plus two?"}, {"role": "assistant", "content": "Four."}],
             records[1]["prompt"] + records[1]["completion"]]
    for i, conv in enumerate(convs):
        full, mask = reference_mask(hf_tok, conv)
        assert data.document(i).tolist() == full
        assert data.loss_mask[int(data.offsets[i]):int(data.offsets[i + 1])].tolist() == mask
    assert hf_tok.decode([t for t, m in zip(full, mask) if m]) == "Hello.<|end|>\n"


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory, tok_dir):
    tmp = tmp_path_factory.mktemp("chat_data")
    numbered = [[{**c[0], "content": f"{c[0]['content']} #{k}"}] + c[1:] for k in range(4) for c in CONVERSATIONS]
    src = write_jsonl(tmp / "chat.jsonl", [{"messages": c} for c in numbered])  # 20 distinct conversations
    assert main([str(src), "-o", str(tmp / "sft"), "--tokenizer", str(tok_dir), "--workers", "1"]) == 0
    return IndexedDataset(tmp / "sft")


def conversations_in(row, data):
    """Split a row at position resets: [(document id, start in row, length)], checking each span is a whole
    document (its ids match one document from its first token) and padding follows the last one."""
    pos, ids = row.position_ids.tolist(), row.input_ids.tolist()
    starts = [j for j, p in enumerate(pos) if p == 0] + [len(pos)]
    found, docs = [], [data.document(d).tolist() for d in range(len(data))]
    for a, b in zip(starts[:-1], starts[1:]):
        assert pos[a:b] == list(range(b - a))
        d = next(d for d, doc in enumerate(docs) if ids[a:a + len(doc)] == doc and len(doc) <= b - a)
        found.append((d, a, len(docs[d])))
        assert a + len(docs[d]) == b or b == len(pos)  # only the last span carries padding
    return found


@pytest.mark.parametrize("mode", ["pack", "pad"])
def test_packing_keeps_conversations_whole_with_resetting_positions_and_masked_labels(chat_data, mode):
    seq_len = int(chat_data.lengths.max()) + 7
    packed = PackedDataset(chat_data, seq_len, seed=3, mode=mode)
    assert packed.describe()["packing"] == "whole documents"
    seen = []
    for i in range(packed.samples_per_epoch):
        row = packed[i]
        ids, labels = row.input_ids.tolist(), row.labels.tolist()
        expect = [IGNORE_INDEX] * seq_len
        for d, a, n in conversations_in(row, chat_data):
            seen.append(d)
            mask = chat_data.loss_mask[int(chat_data.offsets[d]):int(chat_data.offsets[d + 1])].tolist()
            for j in range(a, a + n - 1):  # the target of input j is token j + 1 of the same conversation
                if mask[j + 1 - a]:
                    expect[j] = ids[j + 1]
        assert labels == expect and row.loss_mask.tolist() == [t != IGNORE_INDEX for t in expect]
        if mode == "pad":
            assert len(conversations_in(row, chat_data)) == 1
    assert sorted(seen) == list(range(len(chat_data)))  # every conversation exactly once per epoch
    assert packed.samples_per_epoch < len(chat_data) or mode == "pad"  # 'pack' puts several in a row
    assert packed[packed.samples_per_epoch].input_ids.shape == (seq_len,)  # the next epoch: another row order


def test_loader_rows_are_the_dataset_rows_and_too_long_conversations_are_refused(chat_data, tmp_path):
    corpus = PackedCorpus(chat_data, {"train": torch.arange(len(chat_data))}, seed=0)
    seq_len = int(chat_data.lengths.max())
    loader = corpus.loader("train", seq_len, global_batch_size=4, dp_rank=1, dp_size=2)
    batch = loader.next_batch()
    ds = loader.dataset
    assert torch.equal(batch.labels, torch.stack([ds[2].labels, ds[3].labels]))
    assert bool((batch.labels == IGNORE_INDEX).any()) and bool((batch.labels != IGNORE_INDEX).any())
    longest = int(chat_data.lengths.argmax())
    with pytest.raises(ValueError, match=rf"document {longest} \(record {longest} .*\) has {seq_len} tokens, more "
                                         rf"than seq_len = {seq_len - 1} .*never split across rows; set train.seq_len"):
        PackedDataset(chat_data, seq_len - 1)
    cfg = RunConfig(model=GPTConfig(vocab_size=512, max_seq_len=1024), data=DataConfig(source=chat_data.prefix),
                    train=dataclasses.replace(TrainConfig(), seq_len=seq_len - 1))
    with pytest.raises(ConfigError, match=rf"a conversation of {seq_len} tokens .* more than train.seq_len = "
                                          rf"{seq_len - 1}: .*set train.seq_len={seq_len}"):
        check_data_against_model(cfg)
    check_data_against_model(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seq_len=seq_len)))


def test_max_tokens_refuses_or_truncates(tmp_path, tok_dir, hf_tok, capsys):
    src = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in CONVERSATIONS])
    longest = max(len(tokens(hf_tok, c)) for c in CONVERSATIONS)
    code, err = run([src, "-o", tmp_path / "cut", "--tokenizer", tok_dir, "--max-tokens", 12, "--too-long",
                     "truncate"], capsys)
    data = IndexedDataset(tmp_path / "cut")
    assert code == 0 and int(data.lengths.max()) == 12 < longest and data.meta["truncated_documents"] >= 1
    full, mask = reference_mask(hf_tok, CONVERSATIONS[1])
    assert data.document(1).tolist() == full[:12] and data.loss_mask[int(data.offsets[1]):][:12].tolist() == mask[:12]


def test_plain_text_gets_the_tokenizers_bos_and_byte_level_is_unchanged(tmp_path, tok_dir, hf_tok, capsys):
    src = write_jsonl(tmp_path / "docs.jsonl", [{"text": "Hello there"}, {"text": ""}, {"text": "Fine, thanks!"}])
    assert run([src, "-o", tmp_path / "bos", "--tokenizer", tok_dir, "--workers", 1], capsys)[0] == 0
    data = IndexedDataset(tmp_path / "bos")
    assert data.meta["bos_ids"] == [hf_tok.bos_token_id] and data.meta["version"] == 1 and data.loss_mask is None
    assert data.meta["records"] == "text" and not mask_path(tmp_path / "bos").exists()
    for i, text in enumerate(["Hello there", "", "Fine, thanks!"]):
        assert data.document(i).tolist() == hf_tok(text, add_special_tokens=True)["input_ids"]
    plain = save_tokenizer(tmp_path / "no_bos", bos=False)
    assert run([src, "-o", tmp_path / "nobos", "--tokenizer", plain, "--workers", 1], capsys)[0] == 0
    assert IndexedDataset(tmp_path / "nobos").meta["bos_ids"] == []
    assert run([src, "-o", tmp_path / "bytes"], capsys)[0] == 0
    meta = IndexedDataset(tmp_path / "bytes").meta
    assert "bos_ids" not in meta and IndexedDataset(tmp_path / "bytes").document(0).tolist() == list(b"Hello there")


def _conv(*messages):
    return {"messages": list(messages)}


USER, REPLY = {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}
BAD = [  # (name, records, tokenizer folder variant, what stderr must say)
    ("neither-text-nor-messages", [_conv(USER, REPLY), {"body": "x"}], "chat",
     ["chat.jsonl:2 (record 1)", "no key 'messages' (found ['body'])", "needs 'messages'", "fix or drop the record"]),
    ("first-record-neither", [{"body": "x"}, _conv(USER, REPLY)], "chat",
     ["chat.jsonl:1", "no key 'text' (found ['body'])", "a record needs text or messages", "pass --text-key"]),
    ("unknown-role", [_conv(USER, REPLY), _conv({"role": "narrator", "content": "Once"}, USER, REPLY)], "chat",
     ["chat.jsonl:2 (record 1)", "unknown role 'narrator'", "roles are 'system', 'user', 'assistant', 'tool'",
      "rename it"]),
    ("tool-role-without-template-support", [_conv(USER, REPLY, {"role": "tool", "content": "{}"})], "no_tool",
     ["record 0", "role 'tool'", "never mentions 'tool'", "drop the message"]),
    ("no-chat-template", [_conv(USER, REPLY)], "no_template",
     ["has no chat template", "chat records are rendered with the tokenizer's own template", "save_pretrained"]),
    ("messages-not-a-list", [{"messages": "Hi there"}], "chat",
     ["record 0", "'messages' is str 'Hi there', not a list of {role, content} objects", "write e.g."]),
    ("message-not-role-content", [{"messages": [{"speaker": "me", "text": "Hi"}]}], "chat",
     ["record 0", "'messages'[0] is {'speaker': 'me', 'text': 'Hi'}, not a {role, content} object", "write each"]),
    ("content-not-text", [{"messages": [{"role": "user", "content": 5}]}], "chat",
     ["record 0", "content of type int", "content must be text"]),
    ("template-not-prefix-preserving", [_conv(USER, REPLY)], "counting",
     ["record 0", "not a prefix of the whole conversation's", "rewrites earlier turns is refused"]),
    ("no-assistant-turn", [_conv(USER)], "chat", ["1 conversations and no assistant turn", "nothing is trained"]),
]


@pytest.fixture(scope="module")
def tok_variants(tmp_path_factory, tok_dir):
    tmp = tmp_path_factory.mktemp("variants")
    return {"chat": tok_dir, "no_template": save_tokenizer(tmp / "plain", template=None),
            "no_tool": save_tokenizer(tmp / "notool", template=NO_TOOL_TEMPLATE),
            "counting": save_tokenizer(tmp / "counting", template=COUNTING_TEMPLATE)}


@pytest.mark.parametrize("name,records,variant,says", BAD, ids=[b[0] for b in BAD])
def test_bad_chat_input_is_one_line_and_writes_nothing(tmp_path, tok_variants, capsys, name, records, variant, says):
    src = write_jsonl(tmp_path / "chat.jsonl", records)
    code, err = run([src, "-o", tmp_path / "out", "--tokenizer", tok_variants[variant], "--workers", 1], capsys)
    assert code == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    for part in says:
        assert part in err, (part, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat.jsonl"]  # neither the dataset nor temp files


def test_byte_tokenizer_and_too_long_conversations_are_refused_in_one_line(tmp_path, tok_dir, capsys):
    src = write_jsonl(tmp_path / "chat.jsonl", [_conv(USER, REPLY)] * 3)
    code, err = run([src, "-o", tmp_path / "out"], capsys)
    assert code == 2 and "tokenizer = 'byte' has no chat template" in err and len(err.strip().splitlines()) == 1
    code, err = run([src, "-o", tmp_path / "out", "--tokenizer", tok_dir, "--max-tokens", 3], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "chat.jsonl:1 (record 0): the conversation has" in err and "more than --max-tokens 3" in err
    assert "--too-long truncate" in err and sorted(p.name for p in tmp_path.iterdir()) == ["chat.jsonl"]


def test_a_mask_that_does_not_fit_is_refused_and_overwriting_with_text_removes_it(tmp_path, tok_dir, capsys):
    src = write_jsonl(tmp_path / "chat.jsonl", [_conv(USER, REPLY)] * 2)
    assert run([src, "-o", tmp_path / "d", "--tokenizer", tok_dir, "--workers", 1], capsys)[0] == 0
    mask = mask_path(tmp_path / "d")
    mask.write_bytes(mask.read_bytes()[:-1])
    with pytest.raises(ValueError, match=r"d.mask: \d+ bytes, but .*d.json describes \d+; the files do not belong"):
        IndexedDataset(tmp_path / "d")
    text = write_jsonl(tmp_path / "t.jsonl", [{"text": "Hello there"}])
    assert run([text, "-o", tmp_path / "d", "--tokenizer", tok_dir, "--overwrite"], capsys)[0] == 0
    assert not mask.exists() and IndexedDataset(tmp_path / "d").loss_mask is None
