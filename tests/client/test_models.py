"""token_worker_client.models: the contract's models are the worker's, defined once."""

from __future__ import annotations

import inspect
from types import ModuleType

import pytest
from pydantic import BaseModel, ValidationError

import models.schemas
from token_worker_client import DebitBatchOut, ErrorCode, Failure, MovementOut
from token_worker_client import models as client_models
from token_worker_client.contract import DEBIT_BATCH


def models_of(module: ModuleType) -> dict[str, type[BaseModel]]:
    """The pydantic models ``module`` defines itself."""
    return {
        name: obj
        for name, obj in vars(module).items()
        if inspect.isclass(obj) and issubclass(obj, BaseModel) and obj.__module__ == module.__name__
    }


def test_the_worker_validates_with_the_client_classes() -> None:
    shared = models_of(client_models)
    assert len(shared) > 40
    for name, cls in shared.items():
        assert getattr(models.schemas, name) is cls, name
    # The sweep's fan-out, and the ledger's months (ledger.make_months, the CLI).
    internal = {
        "SweepChunkIn",
        "SweepTotalsIn",
        "SweepPlanned",
        "SweepChunkOut",
        "Month",
        "MonthsOut",
    }
    assert set(models_of(models.schemas)) == internal


def test_a_failure_reads_known_codes_as_error_code_and_dumps_plain_strings() -> None:
    failure = Failure(error="User not found", error_code="USER_NOT_FOUND")
    assert failure.error_code is ErrorCode.USER_NOT_FOUND
    dumped = failure.model_dump()
    assert dumped == {"success": False, "error": "User not found", "error_code": "USER_NOT_FOUND"}
    assert type(dumped["error_code"]) is str  # what the worker stores and signals: unchanged


def test_results_from_a_newer_worker_keep_their_new_fields() -> None:
    movement = {
        "success": True,
        "user_id": "u",
        "operation_type": "x",
        "amount": -1,
        "balance_before": 1,
        "new_balance": 0,
        "tokens_spent": 1,
        "ledger_entry_id": "1",
        "replayed": False,
        "shortfall": 0,  # v1.1
    }
    batch = DEBIT_BATCH.parse(
        {"success": True, "applied": 1, "refused": 0, "results": [movement], "took_ms": 3}
    )
    assert type(batch) is DebitBatchOut and batch.model_extra == {"took_ms": 3}
    (item,) = batch.results
    assert type(item) is MovementOut and item.model_extra == {"shortfall": 0}


@pytest.mark.parametrize("number", [float("nan"), float("inf"), float("-inf")])
def test_metadata_holding_a_number_json_has_not_is_refused(number: float) -> None:
    """Python's json writes NaN and Infinity, PostgreSQL's jsonb refuses them: the typed client
    refuses them first, naming metadata (the worker refuses such a message as not JSON)."""
    with pytest.raises(ValidationError, match=r"metadata\n.*NaN or Infinity"):
        client_models.DebitIn.model_validate(
            {
                "user_id": "u",
                "amount": 1,
                "operation_type": "chatgpt_message",
                "metadata": {"nested": [{"x": number}]},
            }
        )


@pytest.mark.parametrize(
    ("number", "stored"),
    [(1e300, "1" + "0" * 300), (1.5e-07, "0.00000015"), (100.0, "100.0"), (-0.0, "0.0")],
)
def test_metadata_is_measured_with_its_numbers_as_postgresql_stores_them(
    number: float, stored: str
) -> None:
    assert client_models.metadata_bytes({"x": number}) == len('{"x":}') + len(stored)
