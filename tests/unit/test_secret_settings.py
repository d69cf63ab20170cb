"""Sink passwords in the settings: where each may come from, read when the sink connects,
and shown nowhere -- not in a repr, not in a one-line setting error (docs/SECURITY.md,
"Secrets"); and the last line of defence, stratoscope.redact."""

from __future__ import annotations

import io
import logging
import pickle
import uuid
from pathlib import Path

import pytest
from pydantic import ValidationError

from stratoscope.cli import EXIT_USAGE, _regional_config, build_parser, main
from stratoscope.redact import MASK, RedactingFilter, redact, remember
from stratoscope.regional.auth import parse_tokens
from stratoscope.regional.config import RegionalConfig
from stratoscope.regional.sinks.clickhouse import ClickHouseSink
from stratoscope.regional.sinks.config import ClickHouseSettings, KafkaSettings, split_dsn
from stratoscope.regional.sinks.process import ProcessSink

#: Distinctive per run: a match can only be this test's own secret.
SECRET = f"Pw{uuid.uuid4().hex[:12]}"


def config(*argv: str) -> RegionalConfig:
    return _regional_config(build_parser().parse_args(["regional", *argv]))  # type: ignore[no-any-return]


def _shown(obj: object) -> str:
    """Every way a settings object is commonly turned into text."""
    out = [repr(obj), str(obj), f"{obj}", f"{obj!r}"]
    if hasattr(obj, "model_dump_json"):
        out.append(obj.model_dump_json())
    return "\n".join(out)


def test_a_dsn_password_moves_into_a_secret_and_out_of_every_repr() -> None:
    c = config("--clickhouse", f"https://wr%40ter:{SECRET}%2F1@ch.example:9440/metricsdb",
               "--clickhouse-database", "metricsdb")
    ch = c.clickhouse
    assert ch is not None
    assert ch.dsn == "https://ch.example:9440/metricsdb"
    assert ch.user == "wr@ter" and ch.read_password() == f"{SECRET}/1"
    assert ClickHouseSettings(dsn=f"https://{SECRET}@h/db").user == SECRET  # a user, no password
    for shown in (_shown(c), _shown(ch), repr(c.sinks), repr(pickle.loads(pickle.dumps(ch)))):
        assert SECRET not in shown
    # the one with a password from the YAML file, and Kafka's
    yaml_given = RegionalConfig(
        clickhouse=ClickHouseSettings(dsn="https://ch:8443/db", user="w", password=SECRET),
        kafka=KafkaSettings(bootstrap="k:9092", security_protocol="SASL_PLAINTEXT",
                            sasl_username="u", sasl_password=SECRET + "k"))
    assert SECRET not in _shown(yaml_given)
    assert yaml_given.held_secrets() == [SECRET, SECRET + "k"]


def test_the_sink_takes_the_password_apart_from_its_dsn() -> None:
    sink = ClickHouseSink(f"https://w:{SECRET}@ch:8443/db", migrate=False)
    assert sink.dsn == "https://ch:8443/db" and sink.database == "db"
    assert SECRET not in repr(sink) + repr(vars(sink))
    assert SECRET not in repr(ProcessSink(ClickHouseSettings(dsn=f"https://w:{SECRET}@ch/db")))
    with pytest.raises(ValueError, match="both in the DSN and on its own"):
        ClickHouseSink(f"https://w:{SECRET}@ch:8443/db", password="other")
    assert split_dsn("chdb:///x") == ("chdb:///x", None, None)
    assert split_dsn("https://u:@ch/db") == ("https://ch/db", "u", None)
    assert split_dsn("http://[::1]:8123/db") == ("http://[::1]:8123/db", None, None)
    assert split_dsn(f"http://u:{SECRET}%40x@[::1]:8123/db?a=1") == (
        "http://[::1]:8123/db?a=1", "u", f"{SECRET}@x")


def test_a_password_file_is_read_when_the_sink_connects(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    pw = tmp_path / "ch-password"
    pw.write_text("first\n")
    ch = config("--clickhouse", "https://ch:8443/db", "--clickhouse-user", "writer",
                "--clickhouse-password-file", str(pw)).clickhouse
    assert ch is not None and ch.user == "writer"
    pw.write_text(f"{SECRET}\n")  # rotated after the settings were checked
    assert ch.read_password() == SECRET
    assert ch.held_secrets() == []  # a file is read by the sink, not by the settings
    monkeypatch.setenv("STRATOSCOPE_TEST_CH_PW", SECRET)
    ch = config("--clickhouse", "https://ch:8443/db", "--clickhouse-password-env",
                "STRATOSCOPE_TEST_CH_PW").clickhouse
    assert ch is not None and ch.read_password() == SECRET and ch.held_secrets() == [SECRET]
    assert ClickHouseSettings(dsn="https://ch:8443/db").read_password() is None


def test_every_clickhouse_setting_but_the_password_has_a_flag() -> None:
    actions = build_parser()._subparsers._group_actions[0].choices["regional"]._actions  # type: ignore[union-attr]
    flagged = {a.dest.split(".")[1] for a in actions if a.dest.startswith("set:clickhouse.")}
    assert flagged == set(ClickHouseSettings.model_fields) - {"password"}


# Every way to give a password wrongly: (YAML, extra flags, what the one line says). The
# secret is in each somewhere; it must not be in the line.
BAD_SOURCES = [
    ("clickhouse: {dsn: 'https://w:%s@ch/db'}\n", ["--clickhouse-password-file", "{pwfile}"],
     "the ClickHouse password is given twice: in clickhouse.dsn and in clickhouse.password_file"),
    ("clickhouse: {dsn: 'https://w:%s@ch/db', password: other}\n", [],
     "the ClickHouse password is given twice: in clickhouse.dsn and in clickhouse.password"),
    ("clickhouse: {dsn: 'https://w:%s@ch/db', user: x}\n", [],
     "the ClickHouse user is given twice"),
    ("clickhouse: {dsn: 'https://ch/db', password: '%s', password_env: HOME}\n", [],
     "give one of clickhouse.password and clickhouse.password_env, not both"),
    # the password where its variable's name goes: refused unquoted, whatever it looks like
    ("clickhouse: {dsn: 'https://ch/db', password_env: '%s'}\n", [],
     "the environment variable that clickhouse.password_env names is not set"),
    ("clickhouse: {dsn: 'https://ch/db'}\n", ["--clickhouse-password-env", "%s-x"],
     "clickhouse.password_env must be the name of an environment variable"),
    ("clickhouse: {dsn: 'chdb:///var/x', password: '%s'}\n", [],
     "clickhouse.password needs a ClickHouse server"),
    ("clickhouse: {dsn: 'https://ch/db', password: ['%s']}\n", [], "must be a valid string"),
    # an unencoded / or # in the password: the user info does not parse, nothing is quoted
    ("clickhouse: {dsn: 'https://w:%s/x@ch:8443/db'}\n", [], "not shown: it holds an '@'"),
    ("clickhouse: {dsn: 'https://w:x/%s@ch:8443/db'}\n", [], "not shown: it holds an '@'"),
    ("clickhouse: {dsn: 'https://w:x#%s@ch:8443/db'}\n", [], "not shown: it holds an '@'"),
    ("clickhouse: {dsn: 'https://ch:8443/db?password=%s'}\n", [], "takes no password in its query"),
    ("clickhouse: {dsn: 'ftp://w:%s@ch/db'}\n", [], "unsupported ClickHouse DSN scheme 'ftp'"),
    ("kafka: {bootstrap: 'k:9092', security_protocol: SASL_PLAINTEXT, sasl_username: u,"
     " sasl_password: '%s'}\n", ["--kafka-sasl-password-file", "{pwfile}"],
     "give one of sasl_password and sasl_password_file, not both"),
    ("kafka: {bootstrap: 'k:9092', sasl_username: u, sasl_password: '%s'}\n", [],
     "SASL credentials need security_protocol"),
    ("kafka: {bootstrap: 'k:9092', security_protocol: SASL_SSL, sasl_username: u,"
     " sasl_password_env: '%s!'}\n", [], "sasl_password_env must be the name of an environment"),
    ("kafka: {bootstrap: 'k:9092', security_protocol: SASL_SSL, sasl_username: u,"
     " sasl_password_env: '%s'}\n", [], "the environment variable that sasl_password_env names"),
    ("kafka: {bootstrap: 'k:9092', security_protocol: SASL_SSL, sasl_username: u,"
     " sasl_password: '%s', ssl_keyfile: /nonexistent}\n", [], "ssl_certfile and ssl_keyfile go together"),
]


@pytest.mark.parametrize(("yaml_text", "flags", "says"), BAD_SOURCES)
def test_a_bad_password_source_is_one_line_and_exit_2_without_the_secret(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], yaml_text: str, flags: list[str],
        says: str) -> None:
    pwfile = tmp_path / "pw"
    pwfile.write_text(SECRET + "\n")
    settings = tmp_path / "regional.yaml"
    settings.write_text(yaml_text.replace("%s", SECRET))
    argv = [f.replace("{pwfile}", str(pwfile)).replace("%s", SECRET) for f in flags]
    assert main(["regional", "--config", str(settings), *argv]) == EXIT_USAGE
    out, err = capsys.readouterr()
    assert SECRET not in out + err
    assert says in err and len(err.strip().splitlines()) == 1, err


def test_validation_errors_do_not_quote_their_input() -> None:
    """A ValidationError's own text (a helper's traceback) shows no input either."""
    for build in (lambda: ClickHouseSettings(dsn="https://ch/db", password=SECRET, password_env="HOME"),
                  lambda: KafkaSettings(bootstrap="k:9092", sasl_username="u", sasl_password=SECRET),
                  lambda: RegionalConfig(clickhouse={"dsn": f"https://w:{SECRET}@ch/db", "user": "x"})):
        with pytest.raises(ValidationError) as info:
            build()
        assert SECRET not in str(info.value) + repr(info.value)


def test_token_file_errors_name_the_line_not_its_fields() -> None:
    token = "t" * 40 + SECRET
    for text, says in ((f"{token} node-a\n", "line 1: the token (second field) is shorter"),
                       (f"node-a {token}\nnode-b {token}\n", "line 2: the same token as line 1"),
                       (f"node-a {token} x\n", "line 1: expected")):
        with pytest.raises(ValueError, match="line") as info:
            parse_tokens(text, "tokens")
        assert says in str(info.value) and SECRET not in str(info.value)


def test_the_log_filter_masks_remembered_secrets_in_messages_arguments_and_tracebacks() -> None:
    secret = f"Lf{uuid.uuid4().hex[:12]}/+ x"
    remember(secret, "abc")  # too short to remember: masking every "abc" would garble logs
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactingFilter())
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger(f"test.redact.{uuid.uuid4().hex}")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("in the message %s", secret)
        logger.warning("url-encoded: https://u:%s@h", "Lf" + secret[2:].replace("/", "%2F")
                       .replace("+", "%2B").replace(" ", "%20"))
        try:
            raise RuntimeError(f"the driver said {secret}")
        except RuntimeError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    # (not a count of masks: secrets other tests of this process remembered, such as
    # "secret", are masked too, in this file's own path in the traceback)
    assert secret not in text and "%2F" not in text, text
    for masked in (f"in the message {MASK}", f"url-encoded: https://u:{MASK}@h",
                   f"the driver said {MASK}"):
        assert masked in text, text
    assert "Traceback" in text
    assert redact("abc") == "abc"
