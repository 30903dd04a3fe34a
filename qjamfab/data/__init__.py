"""What a run ships: data sets and their slices, content refs (a slice's
name is its hash), the master-side pickling of jobs and params, and
Broadcast values. Below the run logic and the links; above the wire
protocol."""
