"""A fixed amount of CPU work (?n= loop iterations): the light tenant's call.

Fixed work, not fixed time, so that a smaller CPU share shows as a longer call.
"""


def handler(event, context):
    n = int((event.get("queryStringParameters") or {}).get("n", "1000000"))
    x = 0
    for i in range(n):
        x += i
    return {"n": n}
