import logging

from finephys.model.text import load_tokenizer, tokenize, write_clip_tokenizer


def test_real_clip_bpe_ids(tmp_path):
    write_clip_tokenizer(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert len(tok) == 49408
    # ids of OpenAI's CLIP tokenizer (the ones every SD 1.5 tokenizer/vocab.json holds)
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    ids = tokenize(tok, ["a photo", ""])
    assert ids.shape == (2, 77) and ids[1, 0] == 49406 and ids[1, 1] == 49407


def test_long_prompt_truncated_with_warning(tmp_path, caplog):
    write_clip_tokenizer(tmp_path)
    tok = load_tokenizer(tmp_path)
    with caplog.at_level(logging.WARNING):
        ids = tokenize(tok, ["dance " * 100])
    assert ids.shape == (1, 77) and ids[0, -1] == 49407
    assert "truncated" in caplog.text
