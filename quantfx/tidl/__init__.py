"""TI TIDL: device profiles (`profiles`, data from TI's documents) and the checker that says,
node by node, what a device would run on its accelerator (`checker`, `rules`)."""
