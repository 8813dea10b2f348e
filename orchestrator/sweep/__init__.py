"""`imitate-orch sweep`: Ray Tune over λ1, λ2 and the action count (driver, one trial, results)."""
