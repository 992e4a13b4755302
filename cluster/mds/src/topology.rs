//! Topology: logical pools, zones, servers, chunkservers and copysets, the TOML description
//! an operator writes, and the placement of new copysets (pure: inputs -> chosen peers).
//!
//! ```toml
//! [[pool]]
//! name = "pool1"
//! replicas = 3
//! copysets_per_chunkserver = 32
//!
//! [[server]]
//! name = "server1"
//! zone = "zone1"
//! pool = "pool1"
//! chunkservers = 1     # copysets are created once every listed chunkserver registered
//! ```

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

/// A logical pool as described.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PoolSpec {
    /// Name.
    pub name: String,
    /// Replicas per copyset.
    #[serde(default = "default_replicas")]
    pub replicas: usize,
    /// Copysets per chunkserver (on average) when the pool is created.
    #[serde(default = "default_copysets_per_cs")]
    pub copysets_per_chunkserver: usize,
}

fn default_replicas() -> usize {
    3
}
fn default_copysets_per_cs() -> usize {
    32
}

/// A server (host) as described.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ServerSpec {
    /// Name, as chunkservers report it (`--server`).
    pub name: String,
    /// Zone (failure domain), as chunkservers report it (`--zone`).
    pub zone: String,
    /// Pool its chunkservers serve.
    pub pool: String,
    /// Chunkservers expected on it (one per disk).
    #[serde(default = "one")]
    pub chunkservers: usize,
}

fn one() -> usize {
    1
}

/// The cluster as an operator describes it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TopologySpec {
    /// Logical pools.
    #[serde(default)]
    pub pool: Vec<PoolSpec>,
    /// Servers.
    #[serde(default)]
    pub server: Vec<ServerSpec>,
}

impl TopologySpec {
    /// Parses and checks a description.
    pub fn parse(text: &str) -> Result<Self, String> {
        let t: TopologySpec = toml::from_str(text).map_err(|e| e.to_string())?;
        t.check()?;
        Ok(t)
    }

    /// One pool, "pool1", with 3 replicas, taking any chunkserver that registers; its
    /// copysets are created once 3 chunkservers in 3 zones are online.
    pub fn default_single_pool() -> Self {
        TopologySpec {
            pool: vec![PoolSpec {
                name: "pool1".into(),
                replicas: 3,
                copysets_per_chunkserver: default_copysets_per_cs(),
            }],
            server: Vec::new(),
        }
    }

    fn check(&self) -> Result<(), String> {
        if self.pool.is_empty() {
            return Err("no [[pool]]".into());
        }
        let mut names = BTreeSet::new();
        for p in &self.pool {
            if !names.insert(&p.name) {
                return Err(format!("pool {:?} twice", p.name));
            }
            if p.replicas == 0 || p.copysets_per_chunkserver == 0 {
                return Err(format!(
                    "pool {:?}: replicas and copysets must be > 0",
                    p.name
                ));
            }
        }
        let mut servers = BTreeSet::new();
        for s in &self.server {
            if !servers.insert(&s.name) {
                return Err(format!("server {:?} twice", s.name));
            }
            if !names.contains(&s.pool) {
                return Err(format!("server {:?}: no pool {:?}", s.name, s.pool));
            }
        }
        for p in &self.pool {
            let zones: BTreeSet<_> = self
                .server
                .iter()
                .filter(|s| s.pool == p.name)
                .map(|s| &s.zone)
                .collect();
            if !self.server.is_empty() && zones.len() < p.replicas {
                return Err(format!(
                    "pool {:?}: {} replicas need as many zones, the servers give {}",
                    p.name,
                    p.replicas,
                    zones.len()
                ));
            }
        }
        Ok(())
    }

    /// The pool a chunkserver on `server` belongs to (the first pool when servers are not
    /// listed), or why it may not register.
    pub fn pool_of(&self, server: &str, zone: &str) -> Result<usize, String> {
        if self.server.is_empty() {
            return Ok(0);
        }
        let s = self
            .server
            .iter()
            .find(|s| s.name == server)
            .ok_or_else(|| format!("unknown server {server:?}"))?;
        if s.zone != zone {
            return Err(format!(
                "server {server:?} is in zone {:?}, not {zone:?}",
                s.zone
            ));
        }
        Ok(self.pool.iter().position(|p| p.name == s.pool).unwrap_or(0))
    }

    /// Chunkservers a pool waits for before its copysets are created (None: any `replicas`
    /// chunkservers in distinct zones).
    pub fn expected(&self, pool: usize) -> Option<usize> {
        if self.server.is_empty() {
            return None;
        }
        let name = &self.pool[pool].name;
        Some(
            self.server
                .iter()
                .filter(|s| &s.pool == name)
                .map(|s| s.chunkservers)
                .sum(),
        )
    }
}

/// A registered chunkserver, as stored.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ChunkserverRecord {
    /// Id (from 1).
    pub id: u32,
    /// Token it proves itself with in heartbeats.
    pub token: String,
    /// host:port.
    pub address: String,
    /// Zone.
    pub zone: String,
    /// Server.
    pub server: String,
    /// Data directory.
    pub data_dir: String,
    /// Pool (index in the description; id = index + 1).
    pub pool: u32,
}

/// A copyset, as stored.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CopysetRecord {
    /// Logical pool id.
    pub pool: u32,
    /// Copyset id.
    pub id: u32,
    /// Peers (chunkserver ids).
    pub peers: Vec<u32>,
    /// Configuration epoch last reported by its leader.
    pub epoch: u64,
}

/// Picks `count` copysets of `replicas` peers each among `chunkservers` (id, zone): the peers
/// of a copyset are in distinct zones, and copysets spread evenly over chunkservers.
pub fn place_copysets(
    chunkservers: &[(u32, String)],
    count: usize,
    replicas: usize,
) -> Result<Vec<Vec<u32>>, String> {
    let zones: BTreeSet<&str> = chunkservers.iter().map(|(_, z)| z.as_str()).collect();
    if zones.len() < replicas {
        return Err(format!(
            "{replicas} replicas need {replicas} zones, the chunkservers are in {}",
            zones.len()
        ));
    }
    let mut load: BTreeMap<u32, usize> = chunkservers.iter().map(|(id, _)| (*id, 0)).collect();
    let zone_of: HashMap<u32, &str> = chunkservers
        .iter()
        .map(|(id, z)| (*id, z.as_str()))
        .collect();
    let mut out = Vec::with_capacity(count);
    for n in 0..count {
        let mut peers: Vec<u32> = Vec::with_capacity(replicas);
        let mut used_zones = BTreeSet::new();
        for _ in 0..replicas {
            // The least-loaded chunkserver of an unused zone; ties rotate with `n` so that
            // equal loads do not always favour low ids.
            let pick = load
                .iter()
                .filter(|(id, _)| !used_zones.contains(zone_of[*id]))
                .min_by_key(|(id, l)| (**l, (**id as usize + n) % chunkservers.len().max(1)))
                .map(|(id, _)| *id)
                .expect("enough zones checked above");
            used_zones.insert(zone_of[&pick]);
            *load.get_mut(&pick).expect("known") += 1;
            peers.push(pick);
        }
        peers.sort_unstable();
        out.push(peers);
    }
    Ok(out)
}

/// How many copysets a pool of `chunkservers` gets.
pub fn copyset_count(chunkservers: usize, per_cs: usize, replicas: usize) -> usize {
    (chunkservers * per_cs).div_ceil(replicas.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cs(list: &[(u32, &str)]) -> Vec<(u32, String)> {
        list.iter().map(|(i, z)| (*i, z.to_string())).collect()
    }

    #[test]
    fn copysets_span_zones_and_balance() {
        let c = cs(&[(1, "a"), (2, "a"), (3, "b"), (4, "b"), (5, "c"), (6, "c")]);
        let n = copyset_count(6, 10, 3);
        assert_eq!(n, 20);
        let placed = place_copysets(&c, n, 3).unwrap();
        let mut load = BTreeMap::new();
        for peers in &placed {
            let zones: BTreeSet<_> = peers.iter().map(|p| &c[*p as usize - 1].1).collect();
            assert_eq!(zones.len(), 3, "{peers:?} in distinct zones");
            for p in peers {
                *load.entry(*p).or_insert(0) += 1;
            }
        }
        let (min, max) = (load.values().min().unwrap(), load.values().max().unwrap());
        assert!(max - min <= 1, "balanced: {load:?}");
    }

    #[test]
    fn the_shipped_descriptions_parse() {
        for f in ["topology.toml", "topology-3hosts.toml"] {
            let path = format!("{}/../../deploy/{f}", env!("CARGO_MANIFEST_DIR"));
            let t = TopologySpec::parse(&std::fs::read_to_string(&path).unwrap()).unwrap();
            assert!(t.expected(0).unwrap() >= 3, "{f}");
        }
    }

    #[test]
    fn too_few_zones_is_an_error() {
        let c = cs(&[(1, "a"), (2, "a"), (3, "b")]);
        assert!(place_copysets(&c, 4, 3).unwrap_err().contains("3 zones"));
    }

    #[test]
    fn descriptions_parse_and_check() {
        let t = TopologySpec::parse(
            r#"
            [[pool]]
            name = "p"
            [[server]]
            name = "s1"
            zone = "z1"
            pool = "p"
            [[server]]
            name = "s2"
            zone = "z2"
            pool = "p"
            [[server]]
            name = "s3"
            zone = "z3"
            pool = "p"
            chunkservers = 2
            "#,
        )
        .unwrap();
        assert_eq!(t.expected(0), Some(4));
        assert_eq!(t.pool_of("s2", "z2"), Ok(0));
        assert!(
            t.pool_of("s9", "z1")
                .unwrap_err()
                .contains("unknown server")
        );
        assert!(t.pool_of("s2", "z1").unwrap_err().contains("zone"));
        let two_zones = "[[pool]]\nname='p'\n[[server]]\nname='a'\nzone='z'\npool='p'\n";
        assert!(
            TopologySpec::parse(two_zones)
                .unwrap_err()
                .contains("zones")
        );
        assert!(TopologySpec::parse("[[pool]]\nname='p'\nbogus=1").is_err());
        assert!(TopologySpec::parse("").unwrap_err().contains("no [[pool]]"));
    }
}
