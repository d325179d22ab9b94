"""The TLS keys of a unit's config: listener certificates, tickets, pool ``tls``.

``SynchronousTestCase``: runs under trial and pytest.
"""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from nlbproxy import libssl
from nlbproxy.config import BackendTLSConfig, ConfigError, load_config
from tests.certs import CA, temp_dir


class TLSConfig(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = temp_dir(self)
        self.ca = CA(self.dir)
        self.ca.issue("a.pem", dns=["a.test"])
        (self.dir / "secret").write_text("farm secret\n")

    def load(self, listener: str = "", pool: str = "", unit: str = "") -> Any:
        path = self.dir / "unit.toml"
        path.write_text(f'[unit]\n{unit}\n[[listener]]\nname = "web"\nendpoint = "tcp:0"\npool = "app"\n{listener}\n'
                        f'[pool.app]\nhosts = ["127.0.0.1:80"]\n{pool}\n')
        return load_config(str(path))

    def error(self, **parts: str) -> ConfigError:
        with self.assertRaises(ConfigError) as caught:
            self.load(**parts)
        return caught.exception

    def test_listener_certificates_resolve_next_to_the_file(self) -> None:
        config = self.load('certificates = ["a.pem"]\nsession_tickets = "farm"\nticket_key_period = 600',
                           unit='secret_file = "secret"')
        listener = config.listeners[0]
        self.assertEqual(listener.certificates, (str(self.dir / "a.pem"),))
        self.assertEqual((listener.session_tickets, listener.ticket_key_period), ("farm", 600.0))
        self.assertEqual(self.load().listeners[0].certificates, ())

    def test_listener_errors(self) -> None:
        cases = {
            'certificates = []': ("listener[0].certificates", "expected at least one PEM file"),
            'certificates = "a.pem"': ("listener[0].certificates", "expected an array"),
            'certificates = ["a.pem", "ca.pem"]': ("listener[0].certificates[1]", "no private key"),
            'certificates = ["nope.pem"]': ("listener[0].certificates[0]", "No such file"),
            'session_tickets = "unit"': ("listener[0].certificates", "TLS settings need certificates"),
            'certificates = ["a.pem"]\nsession_tickets = "always"': ("listener[0].session_tickets", "expected one of"),
            'certificates = ["a.pem"]\nsession_tickets = "farm"': ("listener[0].session_tickets",
                                                                   "set unit.secret_file too"),
        }
        for listener, (key, reason) in cases.items():
            error = self.error(listener=listener)
            self.assertEqual(error.key, key, listener)
            self.assertIn(reason, error.reason, listener)

    def test_farm_tickets_need_the_process_libssl(self) -> None:
        self.patch(libssl, "_instance", libssl.LibSSLUnavailable("Python's ssl module is not linked to a shared libssl"))
        error = self.error(listener='certificates = ["a.pem"]\nsession_tickets = "farm"', unit='secret_file = "secret"')
        self.assertEqual(error.key, "listener[0].session_tickets")
        self.assertEqual(error.reason, "cannot share ticket keys here: Python's ssl module is not linked to a shared libssl")
        # "unit" tickets need nothing of it.
        self.load('certificates = ["a.pem"]')

    def test_pool_tls(self) -> None:
        config = self.load(pool='tls = { ca_file = "ca.pem", server_name = "Backend.Test" }\naffinity = "tls_session"')
        pool = config.pools["app"]
        self.assertEqual(pool.tls, BackendTLSConfig(str(self.dir / "ca.pem"), "backend.test", True))
        self.assertEqual(pool.affinity, "tls_session")
        self.assertEqual(self.load(pool="tls = { verify = false }").pools["app"].tls, BackendTLSConfig(verify=False))
        self.assertIsNone(self.load().pools["app"].tls)

    def test_pool_tls_errors(self) -> None:
        (self.dir / "junk.pem").write_text("junk\n")
        cases = {
            'tls = { ca_file = "nope.pem" }': ("pool.app.tls.ca_file", "No such file"),
            'tls = { ca_file = "junk.pem" }': ("pool.app.tls.ca_file", "no PEM certificate"),
            'tls = { server_name = "a b" }': ("pool.app.tls.server_name", "expected a DNS name"),
            'tls = { verify = "yes" }': ("pool.app.tls.verify", "expected a boolean"),
            'tls = { sni = "x" }': ("pool.app.tls.sni", "unknown key"),
        }
        for pool, (key, reason) in cases.items():
            error = self.error(pool=pool)
            self.assertEqual(error.key, key, pool)
            self.assertIn(reason, error.reason, pool)
