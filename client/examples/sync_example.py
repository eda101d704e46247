from token_worker_client import InsufficientTokens, TokenClient

with TokenClient(timeout=10.0, retries=2) as tokens:
    tokens.open_account(user_id="alice", initial_balance=100).unwrap()
    spent = tokens.debit(user_id="alice", amount=30, operation_type="image_generation")
    print(type(spent).__name__, spent.success)  # MovementOut True (a refusal: Failure False)
    print(spent.unwrap().new_balance)  # 70
    try:
        tokens.debit(user_id="alice", amount=500, operation_type="image_generation").unwrap()
    except InsufficientTokens as refused:
        print(refused.code, refused.message)  # INSUFFICIENT_TOKENS Insufficient tokens. ...
