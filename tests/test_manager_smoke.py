import pytest_twisted

from tests.support import WsClient, openfast_frame


@pytest_twisted.ensureDeferred
async def test_smoke(manager_factory):
    m = manager_factory().start()
    c = await WsClient.connect(f"{m.url}/ws?path=&proc=")
    r = await c.decoded(openfast_frame(r20=3.0))
    assert r.fail == 0 and r.text == "DISCON called 1 times" and r.swap[46] == 6.0
    c.close()
    await c.closed
