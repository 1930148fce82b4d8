//! What decoding a request message would cost, found before prost decodes
//! it. A 2-byte empty item on the wire becomes a struct of hundreds of bytes
//! once decoded (a BatchCreateUsers of two million empty requests would take
//! gigabytes), so every request is walked once, without allocating, against
//! its schema from the descriptor set, and refused when the estimate exceeds
//! the budget. Count limits (1000 per batch, 100 tags, ...) are checked
//! after decoding, on what is then a bounded amount of memory.

use std::collections::HashMap;
use std::sync::LazyLock;

use prost::Message;
use prost_types::field_descriptor_proto::{Label, Type};

/// Most memory one request message may take once decoded (estimated). An
/// import message of 1000 users is a few MiB; this leaves room for about
/// 30,000 minimal users in one message.
pub const DECODE_BUDGET: usize = 32 * 1024 * 1024;
/// The least a heap allocation costs (malloc's smallest chunk).
const MIN_ALLOC: usize = 32;
/// Nesting beyond this is left to prost, which refuses it.
const MAX_DEPTH: usize = 100;

#[derive(Debug)]
struct Field {
    /// The oneof it belongs to: only the largest member counts inline.
    oneof: Option<i32>,
    repeated: bool,
    /// Index of the message type of a message field.
    message: Option<usize>,
    /// A string or bytes field: its content is copied to the heap.
    heap: bool,
}

#[derive(Debug, Default)]
struct Msg {
    fields: HashMap<u32, Field>,
    /// Bytes of the decoded struct itself (nested singular messages are
    /// stored inline).
    inline: usize,
}

struct Schema {
    by_name: HashMap<String, usize>,
    msgs: Vec<Msg>,
}

static SCHEMA: LazyLock<Schema> = LazyLock::new(|| {
    let fds = prost_types::FileDescriptorSet::decode(crate::proto::FILE_DESCRIPTOR_SET)
        .unwrap_or_default();
    Schema::new(&fds)
});

impl Schema {
    fn new(fds: &prost_types::FileDescriptorSet) -> Self {
        // Every message type by its full name, nested ones included.
        let mut protos = Vec::new();
        fn collect<'a>(
            prefix: &str,
            msgs: &'a [prost_types::DescriptorProto],
            out: &mut Vec<(String, &'a prost_types::DescriptorProto)>,
        ) {
            for m in msgs {
                let name = format!("{prefix}.{}", m.name());
                collect(&name, &m.nested_type, out);
                out.push((name, m));
            }
        }
        for f in &fds.file {
            let pkg = if f.package().is_empty() {
                String::new()
            } else {
                format!(".{}", f.package())
            };
            collect(&pkg, &f.message_type, &mut protos);
        }
        let by_name: HashMap<String, usize> = protos
            .iter()
            .enumerate()
            .map(|(i, (n, _))| (n.clone(), i))
            .collect();
        let msgs: Vec<Msg> = protos
            .iter()
            .map(|(_, d)| Msg {
                fields: d
                    .field
                    .iter()
                    .map(|f| {
                        let message = (f.r#type() == Type::Message)
                            .then(|| by_name.get(f.type_name()).copied())
                            .flatten();
                        let field = Field {
                            oneof: f.oneof_index,
                            repeated: f.label() == Label::Repeated,
                            message,
                            heap: matches!(f.r#type(), Type::String | Type::Bytes),
                        };
                        (f.number() as u32, field)
                    })
                    .collect(),
                inline: 0,
            })
            .collect();
        let mut schema = Schema {
            by_name: by_name
                .into_iter()
                .map(|(k, v)| (k.trim_start_matches('.').to_owned(), v))
                .collect(),
            msgs,
        };
        let mut state = vec![0u8; schema.msgs.len()];
        for i in 0..schema.msgs.len() {
            schema.inline_size(i, &mut state);
        }
        schema
    }

    /// The decoded struct's own size: a word or three per field, nested
    /// singular messages inline (a recursive one counts as a box).
    fn inline_size(&mut self, i: usize, state: &mut [u8]) -> usize {
        match state[i] {
            2 => return self.msgs[i].inline,
            1 => return 8,
            _ => {}
        }
        state[i] = 1;
        let subs: Vec<(Option<i32>, bool, Option<usize>)> = self.msgs[i]
            .fields
            .values()
            .map(|f| (f.oneof, f.repeated, f.message))
            .collect();
        let mut size = 16;
        // A oneof is an enum: its largest member, once.
        let mut oneofs: HashMap<i32, usize> = HashMap::new();
        for (oneof, repeated, message) in subs {
            let member = match (repeated, message) {
                (false, Some(m)) => self.inline_size(m, state) + 8,
                _ => 24,
            };
            match oneof {
                Some(o) => {
                    let e = oneofs.entry(o).or_insert(0);
                    *e = (*e).max(member);
                }
                None => size += member,
            }
        }
        size += oneofs.values().map(|m| m + 8).sum::<usize>();
        self.msgs[i].inline = size;
        state[i] = 2;
        size
    }
}

/// Why a message was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// Decoding it would take more than `budget` bytes.
    OverBudget { budget: usize },
    /// Not protobuf this contract speaks: bad varints or lengths, or groups
    /// (which no message here uses, and which would hide what follows).
    Malformed,
}

/// Checks that decoding `buf` as the message type `full_name` (e.g.
/// `users.v1.BatchCreateUsersRequest`) stays within `budget` bytes.
pub fn check(full_name: &str, buf: &[u8], budget: usize) -> Result<(), Refused> {
    let schema = &*SCHEMA;
    let Some(&root) = schema.by_name.get(full_name) else {
        return Ok(());
    };
    let mut cost = schema.msgs[root].inline;
    walk(schema, root, buf, 0, &mut cost, budget)?;
    if cost > budget {
        Err(Refused::OverBudget { budget })
    } else {
        Ok(())
    }
}

fn varint(buf: &mut &[u8]) -> Option<u64> {
    let mut v: u64 = 0;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = buf.split_first()?;
        *buf = rest;
        v |= u64::from(b & 0x7f) << shift;
        if b < 0x80 {
            return Some(v);
        }
    }
    None
}

/// Adds what decoding `buf` as message `m` allocates to `cost`; stops as
/// soon as the budget is exceeded, and refuses bytes that are not
/// well-formed.
fn walk(
    schema: &Schema,
    m: usize,
    mut buf: &[u8],
    depth: usize,
    cost: &mut usize,
    budget: usize,
) -> Result<(), Refused> {
    use Refused::Malformed;
    if depth > MAX_DEPTH {
        return Err(Malformed);
    }
    let msg = &schema.msgs[m];
    while !buf.is_empty() && *cost <= budget {
        let key = varint(&mut buf).ok_or(Malformed)?;
        let number = (key >> 3) as u32;
        let field = msg.fields.get(&number);
        match key & 7 {
            0 => {
                varint(&mut buf).ok_or(Malformed)?;
                if field.is_some_and(|f| f.repeated) {
                    *cost += 8;
                }
            }
            1 | 5 => {
                let n = if key & 7 == 1 { 8 } else { 4 };
                if buf.len() < n {
                    return Err(Malformed);
                }
                buf = &buf[n..];
                if field.is_some_and(|f| f.repeated) {
                    *cost += 8;
                }
            }
            2 => {
                let len = varint(&mut buf).ok_or(Malformed)?;
                let len = usize::try_from(len).map_err(|_| Malformed)?;
                if buf.len() < len {
                    return Err(Malformed);
                }
                let (payload, rest) = buf.split_at(len);
                buf = rest;
                let Some(f) = field else { continue };
                if let Some(sub) = f.message {
                    if f.repeated {
                        *cost += schema.msgs[sub].inline;
                    }
                    walk(schema, sub, payload, depth + 1, cost, budget)?;
                } else if f.heap {
                    let heap = if payload.is_empty() {
                        0
                    } else {
                        payload.len().max(MIN_ALLOC)
                    };
                    *cost += heap + if f.repeated { 24 } else { 0 };
                } else {
                    // Packed scalars: at most one element per byte.
                    *cost += payload.len() * 8;
                }
            }
            // Groups: no message of this contract has one, and prost skips
            // unknown ones unseen, so they could hide what follows.
            _ => return Err(Malformed),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::users::v1 as pb;

    #[test]
    fn empty_items_are_costed_as_the_structs_they_become() {
        let batch = pb::BatchCreateUsersRequest {
            parent: "projects/a".into(),
            requests: vec![pb::CreateUserRequest::default(); 200_000],
            ..Default::default()
        };
        let bytes = batch.encode_to_vec();
        assert!(bytes.len() < 1024 * 1024, "{}", bytes.len());
        assert_eq!(
            check("users.v1.BatchCreateUsersRequest", &bytes, DECODE_BUDGET),
            Err(Refused::OverBudget {
                budget: DECODE_BUDGET
            })
        );
        // An empty group in front hides nothing.
        let mut hidden = vec![0x7b, 0x7c];
        hidden.extend_from_slice(&bytes);
        assert_eq!(
            check("users.v1.BatchCreateUsersRequest", &hidden, DECODE_BUDGET),
            Err(Refused::Malformed)
        );
        let small = pb::BatchCreateUsersRequest {
            parent: "projects/a".into(),
            requests: vec![
                pb::CreateUserRequest {
                    user: Some(pb::User {
                        email: "a@example.com".into(),
                        tags: vec!["x".into(); 100],
                        ..Default::default()
                    }),
                    ..Default::default()
                };
                1000
            ],
            ..Default::default()
        };
        assert_eq!(
            check(
                "users.v1.BatchCreateUsersRequest",
                &small.encode_to_vec(),
                DECODE_BUDGET
            ),
            Ok(())
        );
        // Nested repeated messages count too: addresses inside a user.
        let addresses = pb::CreateUserRequest {
            user: Some(pb::User {
                addresses: vec![pb::Address::default(); 1_000_000],
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(
            check(
                "users.v1.CreateUserRequest",
                &addresses.encode_to_vec(),
                DECODE_BUDGET
            )
            .is_err()
        );
        // Garbage is refused as such.
        assert_eq!(
            check("users.v1.CreateUserRequest", &[0xff, 0xff], DECODE_BUDGET),
            Err(Refused::Malformed)
        );
        // A full batch with numeric custom data is well within the budget.
        let mut fields = std::collections::BTreeMap::new();
        fields.insert(
            "scores".to_owned(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::ListValue(
                    prost_types::ListValue {
                        values: (0..150)
                            .map(|i| prost_types::Value {
                                kind: Some(prost_types::value::Kind::NumberValue(
                                    f64::from(i) + 0.5,
                                )),
                            })
                            .collect(),
                    },
                )),
            },
        );
        let numeric = pb::BatchCreateUsersRequest {
            parent: "projects/a".into(),
            requests: vec![
                pb::CreateUserRequest {
                    user: Some(pb::User {
                        email: "a@example.com".into(),
                        custom_data: Some(prost_types::Struct { fields }),
                        ..Default::default()
                    }),
                    ..Default::default()
                };
                1000
            ],
            ..Default::default()
        };
        assert_eq!(
            check(
                "users.v1.BatchCreateUsersRequest",
                &numeric.encode_to_vec(),
                DECODE_BUDGET
            ),
            Ok(())
        );
    }
}
