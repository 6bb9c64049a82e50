"""Simulation results as solvers write them (VTU series with a .pvd, XDMF time series, Exodus II, LS-DYNA d3plot),
read one design at a time into [T, M] arrays of the chosen point values; family.py finds the designs of a results
folder and checks that they form one family (one mesh, one set of times, the values present and finite)."""
