import logging

from vaemo_dist.secrets import MASK, MaskSecrets, redact_config, redact_url


def test_urls_lose_user_info_and_query_strings_only():
    assert redact_url("https://AKIA:s3cr3t@host:9000/b/x.tar?X-Amz-Signature=abc#f") == "https://host:9000/b/x.tar"
    assert redact_url("/local/path?odd") == "/local/path?odd"
    assert redact_url("s3://bucket/train-{000000..000009}.tar") == "s3://bucket/train-{000000..000009}.tar"


def test_config_dicts_are_redacted_deep_and_in_comma_lists():
    cfg = {"data": {"shards": "https://h/a.tar?sig=1,https://u:p@h/b.tar", "s3_endpoint": "http://k:s@h:1"},
           "train": {"steps": 3}, "x": ["http://h/?token=2"]}
    assert redact_config(cfg) == {"data": {"shards": "https://h/a.tar,https://h/b.tar", "s3_endpoint": "http://h:1"},
                                  "train": {"steps": 3}, "x": ["http://h/"]}


def test_log_records_are_masked(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "wandb-secret-0123456789")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "short")  # too short to mask safely: left alone
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed with key %s (%s)",
                               ("wandb-secret-0123456789", "short"), None)
    assert MaskSecrets().filter(record)
    assert record.getMessage() == f"failed with key {MASK} (short)"
