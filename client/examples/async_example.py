import asyncio

from token_worker_client import AsyncTokenClient


async def main() -> None:
    async with AsyncTokenClient() as tokens:
        hold = (await tokens.reserve(user_id="alice", operation_type="sora_image")).unwrap()
        ...  # the work; then charge what it cost (at most the hold), the rest is released
        done = (await tokens.capture(reservation_id=hold.reservation_id, amount=8)).unwrap()
        balances = await asyncio.gather(*(tokens.get_balance(user_id=u) for u in ("alice", "bob")))
        print(done.new_balance, [b.success for b in balances])  # 62 [True, False]


asyncio.run(main())
