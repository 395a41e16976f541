"""WriteSAE: sparse autoencoders whose decoder atoms are rank-1 outer products u w^T."""
