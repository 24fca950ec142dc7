"""``sluice up``: the whole product on one machine, supervised."""
