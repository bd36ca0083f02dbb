"""Ray itself: starting or joining a cluster, data-parallel runs under Ray Train, and checks of
cluster-launcher files. Ray's private APIs are reached only through `ray_compat`."""
