"""Launch flags: loopback by default, auth parsing, and the warning for an open bind without auth."""

import app


def test_defaults_bind_loopback_only(monkeypatch):
    monkeypatch.delenv("GRADIO_SERVER_NAME", raising=False)
    monkeypatch.setenv("GRADIO_SERVER_PORT", "7999")
    args = app.parse_args([])
    assert args.host == "127.0.0.1" and args.port == 7999 and args.auth is None
    assert app.is_loopback("127.0.0.1") and app.is_loopback("localhost") and app.is_loopback("::1")
    assert not app.is_loopback("0.0.0.0") and not app.is_loopback("192.168.1.5")


def test_auth_from_a_pair_or_a_file(tmp_path):
    assert app.parse_auth("alice:s3:cret") == [("alice", "s3:cret")]
    pairs = tmp_path / "users.txt"
    pairs.write_text("# team\nalice:one\nbob:two\n")
    assert app.parse_auth(str(pairs)) == [("alice", "one"), ("bob", "two")]
    assert app.parse_auth(None) is None
