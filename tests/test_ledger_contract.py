"""The ledger contract (tests/ledger_contract.py) against each store."""

from pathlib import Path

import pytest
from conftest import PgServer
from ledger_contract import LedgerContract

from batch.ledger import PgLocation, State


class TestSqliteLedger(LedgerContract):
    __test__ = True

    @pytest.fixture
    def state(self, tmp_path: Path) -> State:
        return tmp_path / "state.sqlite"


class TestPostgresLedger(LedgerContract):
    __test__ = True

    @pytest.fixture
    def state(self, pg_server: PgServer) -> State:
        return PgLocation(pg_server.url())
