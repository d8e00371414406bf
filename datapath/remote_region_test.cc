#include "datapath/remote_region.h"

#include <gtest/gtest.h>

#include <array>

#include "regcache/registrar.h"

namespace sanreg {
namespace {

RemoteRegion Sample() {
  RemoteRegion r;
  r.addr = 0x7f0012345000;
  r.length = 1 << 20;
  r.key = 0xdeadbeefcafef00d;
  r.rights = kAccessRemoteRead | kAccessRemoteWrite;
  r.connection = 0x1122334455667788;
  r.generation = 42;
  return r;
}

TEST(RemoteRegionTest, RoundTripsThroughTheWireForm) {
  std::array<uint8_t, RemoteRegion::kWireSize> buf;
  ASSERT_TRUE(Sample().Serialize(buf).ok());
  absl::StatusOr<RemoteRegion> r = RemoteRegion::Parse(buf);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(*r, Sample());
}

TEST(RemoteRegionTest, WireFormIsFixed) {
  std::array<uint8_t, RemoteRegion::kWireSize> buf;
  ASSERT_TRUE(Sample().Serialize(buf).ok());
  EXPECT_EQ(buf[0], 'S');
  EXPECT_EQ(buf[1], 'R');
  EXPECT_EQ(buf[2], 'D');
  EXPECT_EQ(buf[3], '1');
  EXPECT_EQ(buf[4], 1);  // version, little-endian
  EXPECT_EQ(buf[32], 0x0d);  // key, little-endian
  EXPECT_EQ(buf[39], 0xde);
}

TEST(RemoteRegionTest, SerializeRefusesSmallBuffer) {
  std::array<uint8_t, RemoteRegion::kWireSize - 1> buf;
  EXPECT_EQ(Sample().Serialize(buf).code(), absl::StatusCode::kInvalidArgument);
}

TEST(RemoteRegionTest, ParseRefusesWrongSize) {
  std::array<uint8_t, RemoteRegion::kWireSize + 1> buf = {};
  ASSERT_TRUE(Sample().Serialize(buf).ok());
  EXPECT_EQ(RemoteRegion::Parse(buf).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(RemoteRegion::Parse(std::span<const uint8_t>(buf.data(), 10)).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(RemoteRegionTest, ParseRefusesEveryCorruptedByte) {
  std::array<uint8_t, RemoteRegion::kWireSize> good;
  ASSERT_TRUE(Sample().Serialize(good).ok());
  for (size_t i = 0; i < good.size(); ++i) {
    for (uint8_t flip : {0x01, 0x80}) {
      auto bad = good;
      bad[i] ^= flip;
      EXPECT_FALSE(RemoteRegion::Parse(bad).ok()) << "byte " << i << " flip " << int(flip);
    }
  }
}

TEST(RemoteRegionTest, ParseRefusesBadFields) {
  auto check = [](RemoteRegion r) {
    std::array<uint8_t, RemoteRegion::kWireSize> buf;
    ASSERT_TRUE(r.Serialize(buf).ok());
    EXPECT_EQ(RemoteRegion::Parse(buf).status().code(), absl::StatusCode::kInvalidArgument);
  };
  RemoteRegion r = Sample();
  r.rights = 0;
  check(r);
  r = Sample();
  r.rights = kAccessLocalWrite | kAccessRemoteRead;
  check(r);
  r = Sample();
  r.length = 0;
  check(r);
  r = Sample();
  r.addr = ~uint64_t{0} - 10;
  check(r);
}

}  // namespace
}  // namespace sanreg
