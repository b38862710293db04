"""One Redis URL as the user writes it, translated for redis-py and for kombu, and checked at start.

`rediss://:password@host:port/0?ssl_ca_certs=/path/ca.pem&ssl_cert_reqs=required` is the form
redis-py and Celery document. The two libraries disagree on the spelling of `ssl_cert_reqs`
(redis-py: required/optional/none; kombu: CERT_REQUIRED/...), so the TLS options are taken out of
the URL and handed to each library in its own form; either spelling is accepted from the user.
"""
from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis

from segmodel.errors import RelayError

SETTING = "RELAY_BROKER_URL"
_CERT_REQS = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL, "none": ssl.CERT_NONE}
_TLS_KEYS = ("ssl_ca_certs", "ssl_cert_reqs", "ssl_certfile", "ssl_keyfile")


class BrokerConfigError(RelayError):
    """The broker URL is malformed, or the broker it names cannot be used; names the setting."""


def redacted(url: str) -> str:
    """The URL with its password hidden, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


@dataclass(frozen=True)
class RedisTarget:
    url: str                      # the URL without TLS options
    tls: bool
    cert_reqs: str = "required"   # redis-py's spelling
    ca_certs: str | None = None
    certfile: str | None = None
    keyfile: str | None = None

    @classmethod
    def parse(cls, url: str) -> RedisTarget:
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss"):
            raise BrokerConfigError(f"{SETTING}={redacted(url)}: use redis://host:port/db or rediss:// for TLS")
        query = parse_qsl(parts.query, keep_blank_values=True)
        tls_opts = {k: v for k, v in query if k in _TLS_KEYS}
        rest = [(k, v) for k, v in query if k not in _TLS_KEYS]
        tls = parts.scheme == "rediss"
        if tls_opts and not tls:
            raise BrokerConfigError(f"{SETTING}={redacted(url)}: {', '.join(tls_opts)} given on a redis:// URL; "
                                    f"use rediss:// for TLS")
        reqs = tls_opts.get("ssl_cert_reqs", "required").lower().removeprefix("cert_")
        if reqs not in _CERT_REQS:
            raise BrokerConfigError(f"{SETTING}: ssl_cert_reqs={tls_opts['ssl_cert_reqs']!r} is not one of "
                                    f"required, optional, none (or CERT_REQUIRED, CERT_OPTIONAL, CERT_NONE)")
        for key in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
            if key in tls_opts and not os.path.isfile(tls_opts[key]):
                raise BrokerConfigError(f"{SETTING}: {key}={tls_opts[key]} is not a readable file")
        clean = urlunsplit(parts._replace(query=urlencode(rest)))
        return cls(url=clean, tls=tls, cert_reqs=reqs, ca_certs=tls_opts.get("ssl_ca_certs"),
                   certfile=tls_opts.get("ssl_certfile"), keyfile=tls_opts.get("ssl_keyfile"))

    def redis_py_options(self) -> dict[str, object]:
        if not self.tls:
            return {}
        return {"ssl_cert_reqs": self.cert_reqs, "ssl_ca_certs": self.ca_certs, "ssl_certfile": self.certfile,
                "ssl_keyfile": self.keyfile}

    def kombu_ssl(self) -> dict[str, object] | None:
        """Celery's broker_use_ssl: the ssl module's constants, which kombu passes to redis-py as is."""
        if not self.tls:
            return None
        opts: dict[str, object] = {"ssl_cert_reqs": _CERT_REQS[self.cert_reqs]}
        opts.update({k: v for k, v in (("ssl_ca_certs", self.ca_certs), ("ssl_certfile", self.certfile),
                                       ("ssl_keyfile", self.keyfile)) if v})
        return opts


def client(url: str, **kwargs: object) -> redis.Redis:
    target = RedisTarget.parse(url)
    return redis.Redis.from_url(target.url, **{**target.redis_py_options(), **kwargs})


def check(url: str, timeout_s: float = 10.0) -> None:
    """PING the broker; a failure becomes a BrokerConfigError that says which part to change."""
    target = RedisTarget.parse(url)
    shown = f"{SETTING}={redacted(url)}"
    conn = redis.Redis.from_url(target.url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                **target.redis_py_options())  # type: ignore[arg-type]
    try:
        conn.ping()
    except (redis.AuthenticationError, redis.ResponseError) as exc:
        if urlsplit(url).password is None and ("NOAUTH" in str(exc) or "authenticated" in str(exc)):
            raise BrokerConfigError(f"{shown}: the server wants a password (redis[s]://:PASSWORD@host:port/0)") from exc
        if isinstance(exc, redis.AuthenticationError):
            raise BrokerConfigError(f"{shown}: the server refused the password ({exc})") from exc
        raise BrokerConfigError(f"{shown}: {exc}") from exc
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        text = str(exc)
        if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
            raise BrokerConfigError(f"{shown}: the server's TLS certificate does not verify "
                                    f"(give its CA with ?ssl_ca_certs=/path/ca.pem): {text}") from exc
        if target.tls and ("WRONG_VERSION_NUMBER" in text or "wrong version number" in text or "record layer" in text):
            raise BrokerConfigError(f"{shown}: the server does not speak TLS on that port; use redis://") from exc
        if target.tls and "Timeout" in text:
            # A plain Redis port reads the TLS hello as a half-written command and waits for the rest.
            raise BrokerConfigError(f"{shown}: no TLS handshake within {timeout_s:g} s; if the server does not "
                                    f"speak TLS on that port, use redis://") from exc
        if not target.tls and ("Connection closed" in text or "Connection reset" in text or isinstance(exc, redis.TimeoutError)):
            raise BrokerConfigError(f"{shown}: the server closed the connection without answering; "
                                    f"if that port speaks TLS, use rediss://") from exc
        raise BrokerConfigError(f"{shown}: cannot reach the broker ({text})") from exc
    finally:
        conn.close()
