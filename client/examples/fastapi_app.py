from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Header, HTTPException

from token_worker_client import AsyncTokenClient, ErrorCode, Failure, MovementOut, TokenTimeout

STATUS: dict[str, int] = {
    ErrorCode.INSUFFICIENT_TOKENS: 402,
    ErrorCode.USER_NOT_FOUND: 404,
    ErrorCode.UNKNOWN_OPERATION_TYPE: 422,
    ErrorCode.NOT_CHARGEABLE: 422,
    ErrorCode.VALIDATION_ERROR: 422,
}


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with AsyncTokenClient(timeout=5.0) as tokens:
        app.state.tokens = tokens
        yield


app = FastAPI(lifespan=lifespan)


@app.post("/users/{user_id}/charges/{operation_type}")
async def charge(
    user_id: str, operation_type: str, idempotency_key: str | None = Header(default=None)
) -> MovementOut:
    tokens: AsyncTokenClient = app.state.tokens
    try:
        result = await tokens.charge(
            user_id=user_id, operation_type=operation_type, idempotency_key=idempotency_key
        )
    except TokenTimeout as exc:  # may still apply: the caller retries with this key
        raise HTTPException(504, {"retry_with_idempotency_key": exc.idempotency_key}) from exc
    if isinstance(result, Failure):
        status = STATUS.get(result.error_code, 409)
        raise HTTPException(status, {"error_code": result.error_code, "error": result.error})
    return result
