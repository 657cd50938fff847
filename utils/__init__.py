"""The bottom layer of psc: small pieces every other layer uses (``models`` <- ``pipelines``
<- ``plugins`` and ``app``, all of them on ``utils``). Nothing here imports torch."""
